"""A study's statistics: spread over seeds, the seed-paired differences and the decision rule (a
two-sided paired t-test at 95 %), per round and at equal bytes, and their recheck from committed
JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.bench.study.run import Cell, StudyResult
from fedlora.report import higher_is_better


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def beyond_spread(diffs: Sequence[float]) -> bool:
    """Seed-paired differences that all have one sign and whose mean exceeds their standard
    deviation (never with fewer than two seeds: one value has no spread)."""
    if len(diffs) < 2:
        return False
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return same_sign and abs(statistics.fmean(diffs)) > statistics.stdev(diffs)


DECISION_LEVEL = 0.05
"""Two-sided significance level of the paired t-test that decides a difference."""


def paired_test(diffs: Sequence[float]) -> dict[str, Any]:
    """A two-sided paired t-test of seed-paired ``diffs`` against 0: ``t``, ``df``, ``p`` and
    ``decided`` (``p < DECISION_LEVEL``). Fewer than two seeds decide nothing; differences that
    are all equal and non-zero (no spread at all) are decided."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return {"t": None, "df": n - 1, "p": None, "decided": False}
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0.0:
        p = 0.0 if mean != 0.0 else 1.0
        return {"t": None, "df": n - 1, "p": p, "decided": mean != 0.0}
    t = mean / (sd / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t), df=n - 1))
    return {"t": t, "df": n - 1, "p": p, "decided": p < DECISION_LEVEL}


def recheck_decisions(results: Path) -> tuple[int, list[dict[str, object]]]:
    """How many seed-paired comparisons the study JSONs under ``results`` hold, and those that
    :func:`paired_test` decides differently from the flag they were rendered with
    (``beyond_spread``, the rule before 2026-12-06), recomputed from the values in the JSON."""
    total, changed = 0, []
    for path in sorted(results.glob("*/*.json")):
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or "variants" not in payload:
            continue
        reference = payload.get("reference") or "flora"
        for variant, v in payload["variants"].items():
            per = v.get("strategies", {})
            for metric, rows in v.get("differences", {}).items():
                base = per.get(reference, {}).get(metric, {}).get("values")
                for strategy, d in rows.items() if base else ():
                    values = per[strategy][metric]["values"]
                    test = paired_test([a - b for a, b in zip(values, base, strict=True)])
                    total += 1
                    if test["decided"] != d["beyond_spread"]:
                        changed.append(
                            {
                                "study": path.stem,
                                "variant": variant,
                                "metric": metric,
                                "strategy": strategy,
                                "mean": d["mean"],
                                "p": test["p"],
                                "seeds": len(values),
                                "decided": test["decided"],
                            }
                        )
    return total, changed


def recheck_at_bytes(results: Path) -> list[dict[str, Any]]:
    """Every seed-paired comparison of the study JSONs under ``results`` whose methods' traffic
    differs, recomputed at equal bytes (:func:`differences_at_bytes`) from the cells in the JSON,
    beside the decision at the final round. No run is repeated."""
    rows: list[dict[str, Any]] = []
    for path in sorted(results.glob("*/*.json")):
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or "variants" not in payload or "cells" not in payload:
            continue
        reference = payload.get("reference") or "flora"
        metrics = payload.get("metrics") or ["loss"]
        for variant, v in payload["variants"].items():
            cells = [c for c in payload["cells"] if c.get("variant") == variant]
            final = v.get("differences", {})
            for metric, per in differences_at_bytes(cells, metrics, reference).items():
                for strategy, d in per.items():
                    at_end = final.get(metric, {}).get(strategy, {})
                    rows.append(
                        {
                            "study": path.stem,
                            "variant": variant,
                            "metric": metric,
                            "strategy": strategy,
                            "reference": reference,
                            **{k: d[k] for k in ("mean", "min", "max", "p", "decided", "better")},
                            "budget_mb": d["budget_mb"]["mean"],
                            "rounds": d["rounds"],
                            "reference_rounds": d["reference_rounds"],
                            "final_mean": at_end.get("mean"),
                            "final_decided": at_end.get("decided", at_end.get("beyond_spread")),
                        }
                    )
    return rows


def ranges_disjoint(a: Sequence[float], b: Sequence[float]) -> bool:
    """The seed ranges of ``a`` and ``b`` do not overlap (never with fewer than two seeds)."""
    if len(a) < 2 or len(b) < 2:
        return False
    return max(a) < min(b) or max(b) < min(a)


def statistics_of(result: StudyResult) -> dict[str, Any]:
    """Per variant: per strategy the spread of each metric's final value (and of traffic and
    seconds), and per metric the seed-paired difference of each strategy from the reference."""
    study = result.study
    out: dict[str, Any] = {}
    for variant in study.variants:
        cells = [c for c in result.cells if c.variant == variant.name]
        per: dict[str, Any] = {}
        for strategy in variant.strategies:
            mine = sorted((c for c in cells if c.strategy == strategy), key=lambda c: c.seed)
            stats: dict[str, Any] = {}
            for metric in study.metrics:
                values = [v for c in mine if (v := c.final(metric)) is not None]
                if values:
                    stats[metric] = spread(values)
            comm = [c.summary.get("communication") or {} for c in mine]
            if all(comm):
                stats["up_mb"] = spread([x["up_bytes"] / 1e6 for x in comm])
                stats["down_mb"] = spread([x["down_bytes"] / 1e6 for x in comm])
                stats["ratio_to_full"] = spread([x["ratio_to_full"] for x in comm])
            norms = [c.update_norm for c in mine if c.update_norm is not None]
            if mine and len(norms) == len(mine):
                stats["update_norm"] = spread(norms)
            stats["seconds"] = spread([c.seconds for c in mine])
            stats["curves"] = _mean_curves(mine, study.metrics)
            per[strategy] = stats
        out[variant.name] = {"strategies": per}
    for variant in study.variants:
        per = out[variant.name]["strategies"]
        ref = study.reference
        if ref in per:
            out[variant.name]["differences"] = _differences(
                study.metrics, {s: x for s, x in per.items() if s != ref}, per[ref]
            )
            records = [c.record(study.metrics) for c in result.cells if c.variant == variant.name]
            at_bytes = differences_at_bytes(records, study.metrics, ref)
            if at_bytes:
                out[variant.name]["differences_at_bytes"] = at_bytes
        rv = study.reference_variant
        if rv is not None and rv != variant.name:
            base = out[rv]["strategies"]
            across: dict[str, dict[str, Any]] = {}
            for s in per:
                if s in base:
                    for metric, rows in _differences(study.metrics, {s: per[s]}, base[s]).items():
                        across.setdefault(metric, {}).update(rows)
            out[variant.name]["differences_from_variant"] = across
    return out


def _mean_curves(
    cells: Sequence[Cell], metrics: Sequence[str]
) -> dict[str, dict[int, dict[str, float]]]:
    curves: dict[str, dict[int, dict[str, float]]] = {}
    for metric in metrics:
        by_round: dict[int, list[float]] = {}
        for c in cells:
            for r, v in c.summary.get("per_round", {}).get(metric, {}).items():
                by_round.setdefault(int(r), []).append(float(v))
        if by_round:
            curves[metric] = _bands(by_round)
    mb: dict[int, list[float]] = {}
    for c in cells:
        for r, v in c.summary.get("cumulative_bytes", {}).items():
            mb.setdefault(int(r), []).append(float(v) / 1e6)
    if mb:
        curves["cumulative_mb"] = _bands(mb)
    return curves


def _bands(by_round: dict[int, list[float]]) -> dict[int, dict[str, float]]:
    """Per round: the mean, min and max over seeds."""
    return {
        r: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
        for r, v in sorted(by_round.items())
    }


def _differences(
    metrics: Sequence[str], others: dict[str, Any], reference: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per metric, per name in ``others``: its seed-paired difference from ``reference``."""
    out: dict[str, Any] = {}
    for metric in metrics:
        if metric not in reference:
            continue
        higher = higher_is_better(metric)
        base = reference[metric]["values"]
        rows = {}
        for strategy, stats in others.items():
            if metric not in stats or stats[metric]["n"] != len(base):
                continue
            values = stats[metric]["values"]
            rows[strategy] = _difference_row(values, base, higher)
        out[metric] = rows
    return out


def _difference_row(values: Sequence[float], base: Sequence[float], higher: bool) -> dict[str, Any]:
    """The seed-paired difference ``values − base``: its mean, range, paired t-test and whether
    it favours ``values`` (``higher``: a larger metric is better)."""
    diffs = [v - b for v, b in zip(values, base, strict=True)]
    mean = statistics.fmean(diffs)
    test = paired_test(diffs)
    return {
        "mean": mean,
        "min": min(diffs),
        "max": max(diffs),
        "decided": test["decided"],
        "t": test["t"],
        "df": test["df"],
        "p": test["p"],
        "beyond_spread": beyond_spread(diffs),
        "ranges_disjoint": ranges_disjoint(values, base),
        "better": (mean > 0) == higher and mean != 0,
    }


def value_within_bytes(
    cell: dict[str, Any], metric: str, budget: float
) -> tuple[int, float] | None:
    """``(round, value)`` of ``metric`` at the last evaluated round of ``cell`` (a study JSON's
    cell: ``per_round`` and ``cumulative_bytes``) whose cumulative bytes, up and down over all
    clients, do not exceed ``budget``; None when no evaluated round is within it. A step, not an
    interpolation: the value a run had actually reached once it had exchanged that much."""
    points = {int(r): float(v) for r, v in cell.get("per_round", {}).get(metric, {}).items()}
    spent = {int(r): float(b) for r, b in cell.get("cumulative_bytes", {}).items()}
    within = [r for r in points if r in spent and spent[r] <= budget]
    return (max(within), points[max(within)]) if within else None


def _total_bytes(cell: dict[str, Any]) -> float | None:
    """The bytes a run exchanged in all, None for a run that exchanged none (centralized)."""
    spent = {int(r): float(b) for r, b in cell.get("cumulative_bytes", {}).items()}
    total = spent[max(spent)] if spent else 0.0
    return total if total > 0 else None


def differences_at_bytes(
    cells: Sequence[dict[str, Any]], metrics: Sequence[str], reference: str
) -> dict[str, dict[str, Any]]:
    """Per metric, per strategy whose traffic differs from ``reference``'s: the seed-paired
    difference at equal bytes. On each seed the budget is the smaller of the two runs' total
    bytes (up and down, all clients); each run is scored at its last evaluation within that
    budget (:func:`value_within_bytes`), so the method that exchanged more is judged where it
    stood when it had exchanged as much as the other did in the whole run. ``cells`` are one
    variant's cells as a study JSON keeps them. Strategies without traffic (centralized,
    standalone) or with the reference's exact traffic have no row."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for c in cells:
        by.setdefault(c["strategy"], {})[int(c["seed"])] = c
    base = by.get(reference, {})
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        rows = {}
        for strategy, mine in by.items():
            seeds = sorted(set(mine) & set(base))
            if strategy == reference or not seeds or set(mine) != set(base):
                continue
            row = _paired_at_bytes([mine[s] for s in seeds], [base[s] for s in seeds], metric)
            if row is None:
                continue
            rows[strategy] = row
        if rows:
            out[metric] = rows
    return out


def _paired_at_bytes(
    mine: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], metric: str
) -> dict[str, Any] | None:
    """:func:`differences_at_bytes`'s row for seed-paired cells ``mine`` and ``base``; None when
    a run has no traffic or no evaluation within the budget, or the traffic is the same."""
    values, refs, rounds, ref_rounds, budgets, same = [], [], [], [], [], True
    for a, b in zip(mine, base, strict=True):
        spent_a, spent_b = _total_bytes(a), _total_bytes(b)
        if spent_a is None or spent_b is None:
            return None
        same = same and spent_a == spent_b
        budget = min(spent_a, spent_b)
        x, y = value_within_bytes(a, metric, budget), value_within_bytes(b, metric, budget)
        if x is None or y is None:
            return None
        rounds.append(x[0])
        values.append(x[1])
        ref_rounds.append(y[0])
        refs.append(y[1])
        budgets.append(budget / 1e6)
    if same:
        return None
    row = _difference_row(values, refs, higher_is_better(metric))
    row.update(budget_mb=spread(budgets), rounds=rounds, reference_rounds=ref_rounds)
    return row

"""A study's report: ``NAME.json``, the markdown tables and the plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.bench.provenance import provenance
from fedlora.bench.study.run import StudyResult
from fedlora.bench.study.spec import TUNED_SUFFIX, Study, Tune, _has_gpu
from fedlora.bench.study.statistics import statistics_of


def _pm(stats: dict[str, Any] | None, digits: int = 4) -> str:
    if not stats:
        return ""
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def study_markdown(result: StudyResult, stats: dict[str, Any], png: str) -> str:
    study = result.study
    lines = _intro(study)
    lines += [
        f"Seeds {', '.join(map(str, study.seeds))}; each cell is mean ± sample standard "
        "deviation over the seeds of the final round's held-out value. ‖ΔW‖ is the Frobenius "
        "norm, over all modules, of the update the exported adapter holds (the whole change to "
        "the base model). Communication is per "
        f"client per round. The {len(result.cells)} runs took "
        f"{sum(c.seconds for c in result.cells) / 60:.0f} minutes.",
        "",
    ]
    for variant in study.variants:
        per = stats[variant.name]["strategies"]
        heads = [f"final {m}" for m in study.metrics]
        lines += [
            f"## {variant.name}",
            "",
            f"Settings: `{' '.join(variant.overrides) or '(base)'}`",
            *[
                f"{strategy}: `{' '.join(sets)}`"
                for strategy, sets in variant.strategy_overrides.items()
            ],
            "",
            "| strategy | "
            + " | ".join(heads)
            + " | ‖ΔW‖ | up MB | down MB | ratio to full FT | s / run |",
            "|---" * (len(heads) + 6) + "|",
        ]
        for strategy, s in per.items():
            cells = [_pm(s.get(m)) for m in study.metrics]
            lines.append(
                f"| {strategy} | "
                + " | ".join(cells)
                + f" | {_pm(s.get('update_norm'), 3)}"
                + f" | {_pm(s.get('up_mb'), 3)} | {_pm(s.get('down_mb'), 3)} | "
                + f"{_pm(s.get('ratio_to_full'), 5)} | {s['seconds']['mean']:.0f} |"
            )
        for key, what in (
            ("differences", f"{study.reference} in this variant"),
            ("differences_at_bytes", f"{study.reference} at equal bytes"),
            ("differences_from_variant", f"the same strategy in variant {study.reference_variant}"),
        ):
            diffs = stats[variant.name].get(key)
            if diffs:
                lines += ["", *_difference_table(diffs, what, list(per))]
        lines.append("")
    if result.tuning and study.tune is not None:
        lines += _tuning_table(result.tuning, study.tune)
    lines += [f"![per-round curves]({png})", ""]
    if study.against_bytes:
        lines += [f"![against cumulative bytes]({Path(png).stem}-bytes.png)", ""]
    return "\n".join(lines)


def _tuning_table(tuning: dict[str, dict[str, dict[str, Any]]], tune: Tune) -> list[str]:
    lrs = list(
        dict.fromkeys(lr for per in tuning.values() for e in per.values() for lr in e["scores"])
    )
    source = ""
    if tune.results is not None:
        source = " (from " + ", ".join(f"`{path.name}`" for path in tune.results) + ")"
    if tune.variant is not None:
        source += f", on the variant `{tune.variant}` alone, whose lrs every variant takes"
    then = (
        "."
        if tune.only
        else f"; the best lr (**bold**) ran on every seed as the `NAME{TUNED_SUFFIX}` variant."
    )
    lines = [
        "## Learning-rate tuning",
        "",
        f"Every strategy ran each lr on one seed{source}, scored by its final value on the "
        "validation split, not the test split the other tables report; **bold**: the best lr"
        + then,
        "",
    ]
    for variant, per in tuning.items():
        lines += [
            f"{variant}:",
            "",
            "| strategy | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
            "|---" * (len(lrs) + 1) + "|",
        ]
        for strategy, entry in per.items():
            cells = []
            for lr in lrs:
                v = entry["scores"].get(lr)
                text = "—" if v is None else f"{v:.4f}"
                cells.append(f"**{text}**" if lr == entry.get("best") else text)
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _difference_table(diffs: dict[str, dict[str, Any]], what: str, order: list[str]) -> list[str]:
    budget = ""
    if what.endswith("at equal bytes"):
        budget = (
            " On each seed both runs are scored at their last evaluation within the smaller of "
            "the two runs' total bytes (up and down, all clients); the budget, in MB, and the "
            "rounds each method had reached follow each cell."
        )
    lines = [
        f"Difference from {what}, seed by seed (mean [min, max]); **bold**: decided, a two-sided "
        "paired t-test over the seeds at 95 % (p < 0.05, n − 1 degrees of freedom); †: the seed "
        "ranges are also disjoint; never with one seed." + budget,
        "",
        "| strategy | " + " | ".join(diffs) + " |",
        "|---" * (len(diffs) + 1) + "|",
    ]
    for name in sorted({n for rows in diffs.values() for n in rows}, key=order.index):
        cells = []
        for metric in diffs:
            d = diffs[metric].get(name)
            if d is None:
                cells.append("")
                continue
            text = f"{d['mean']:+.4f} [{d['min']:+.4f}, {d['max']:+.4f}]"
            text = f"**{text}**" if d.get("decided", d["beyond_spread"]) else text
            text += " †" if d["ranges_disjoint"] else ""
            if "budget_mb" in d:
                text += (
                    f" ({d['budget_mb']['mean']:.3g} MB; rounds {_rounds(d['rounds'])} vs "
                    f"{_rounds(d['reference_rounds'])})"
                )
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _rounds(rounds: Sequence[int]) -> str:
    low, high = min(rounds), max(rounds)
    return str(low) if low == high else f"{low}–{high}"


def plot_study(
    result: StudyResult, stats: dict[str, Any], path: Path, against_bytes: bool = False
) -> Path:
    """A panel per variant (row) and metric (column): the metric per round (or, with
    ``against_bytes``, against the cumulative MB up and down over all clients, both means over
    seeds), mean over seeds, min–max band; one colour per strategy across all panels."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    study = result.study
    rows, cols = len(study.variants), len(study.metrics)
    strategies = list(dict.fromkeys(s for v in study.variants for s in v.strategies))
    palette = plt.get_cmap("tab10" if len(strategies) <= 10 else "tab20")
    colour = {s: palette(i) for i, s in enumerate(strategies)}
    fig, axes = plt.subplots(
        rows, cols, figsize=(5 * cols, 3.6 * rows + 0.8), dpi=100, squeeze=False
    )
    for row, variant in zip(axes, study.variants, strict=True):
        for col, (ax, metric) in enumerate(zip(row, study.metrics, strict=True)):
            for strategy, s in stats[variant.name]["strategies"].items():
                curve = s["curves"].get(metric)
                if not curve:
                    continue
                rounds = sorted(curve)
                mb = s["curves"].get("cumulative_mb", {})
                if against_bytes and not all(r in mb for r in rounds):
                    continue
                xs = [mb[r]["mean"] for r in rounds] if against_bytes else rounds
                c = colour[strategy]
                means = [curve[r]["mean"] for r in rounds]
                ax.plot(xs, means, marker="o", color=c, label=strategy)
                lo, hi = [curve[r]["min"] for r in rounds], [curve[r]["max"] for r in rounds]
                ax.fill_between(xs, lo, hi, color=c, alpha=0.12)
            ax.set_title(f"{variant.name}: {metric}", fontsize=10)
            if against_bytes:
                ax.set_xlabel("cumulative MB, up and down, all clients")
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlabel("round (0 = base model)")
            ax.set_ylabel(f"held-out {metric}")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7)
    title = f"{study.title}: mean over seeds {study.seeds}, band = min–max"
    fig.suptitle("\n".join(textwrap.wrap(title, width=34 * cols)), fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_study(result: StudyResult, out: Path) -> dict[str, Path]:
    """``OUT/NAME.json``, ``.md`` and ``.png``; their paths."""
    study = result.study
    out.mkdir(parents=True, exist_ok=True)
    if not result.cells:  # a tuning study ([tune] only = true): the grid and the best lrs
        return _write_tuning(result, out)
    stats = statistics_of(result)
    paths = {k: out / f"{study.name}.{k}" for k in ("json", "md", "png")}
    if study.against_bytes:
        paths["bytes_png"] = out / f"{study.name}-bytes.png"
    payload = {
        **_header(result),
        "seeds": study.seeds,
        "metrics": study.metrics,
        "reference": study.reference,
        "reference_variant": study.reference_variant,
        "run_seconds": sum(c.seconds for c in result.cells),
        "variants": {
            v.name: {
                "set": v.overrides,
                "strategies": v.strategies,
                "strategy_set": v.strategy_overrides,
                **stats[v.name],
            }
            for v in study.variants
        },
        "against_bytes": study.against_bytes,
        "cells": [c.record(study.metrics) for c in result.cells],
        "configs": result.configs,
    }
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    plot_study(result, stats, paths["png"])
    if study.against_bytes:
        plot_study(result, stats, paths["bytes_png"], against_bytes=True)
    paths["md"].write_text(study_markdown(result, stats, paths["png"].name))
    return paths


def _write_tuning(result: StudyResult, out: Path) -> dict[str, Path]:
    study = result.study
    assert study.tune is not None
    paths = {k: out / f"{study.name}.{k}" for k in ("json", "md")}
    seconds = [s for per in result.tuning.values() for e in per.values()
               for s in e.get("seconds", {}).values()]  # fmt: skip
    payload = {**_header(result), "run_seconds": sum(seconds)}
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    lines = [*_intro(study), *_tuning_table(result.tuning, study.tune)]
    paths["md"].write_text("\n".join(lines))
    return paths


def _header(result: StudyResult) -> dict[str, Any]:
    """What every study JSON starts with: the study, where it came from, and its lr tuning."""
    study = result.study
    tune = dataclasses.asdict(study.tune) if study.tune is not None else None
    return {
        "study": study.name,
        "title": study.title,
        "study_file": str(study.source) if study.source else None,
        "provenance": provenance(),
        "seconds": result.seconds,
        "gpu": _has_gpu(),
        "tune": {k: _paths_as_text(v) for k, v in tune.items()} if tune else None,
        "tuning": result.tuning,
    }


def _paths_as_text(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple) and all(isinstance(x, Path) for x in value):
        return [str(x) for x in value]
    return value


def _intro(study: Study) -> list[str]:
    """A study's markdown title and notes."""
    return [f"# {study.title}", "", *([study.notes.strip(), ""] if study.notes else [])]

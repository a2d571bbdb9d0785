"""Benchmark studies: a grid of runs (variants × strategies × seeds) described by a study file,
with the mean and spread over seeds, per-round curves, and which differences exceed the spread.

A study file (TOML) names a base config and what varies::

    name = "quality"
    title = "FLoRA's Table 1 setting, scaled down"
    config = "../configs/default.toml"   # relative to the study file; optional
    set = ["rounds=2", "clients.num_clients=10"]
    gpu_set = ["train.steps=50"]          # added when a CUDA GPU is present
    seeds = [0, 1, 2]
    metrics = ["accuracy", "loss"]        # the first is the headline
    reference = "flora"                   # others are compared with it, seed by seed
    reference_variant = "het"             # or: each variant's strategies against this one's
    against_bytes = true                  # also NAME-bytes.png: metrics against cumulative bytes

    [[variant]]
    name = "heterogeneous"
    set = ["clients.ranks=flora"]
    strategies = ["flora", "zeropad"]

An optional ``[tune]`` section tunes each strategy's learning rate by one rule::

    [tune]
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]   # the grid
    seed = 0                          # one seed (default: the first of ``seeds``)
    metric = "loss"                   # scored on the validation split (default: the headline)
    fixed = true                      # also keep the config's own lr (the fixed-lr table)
    only = false                      # true: run the grid, report it, stop (a tuning study)
    # results = "../benchmarks/results/T/T.json"   # instead of lrs: a tuning study's best lrs
    # variant = "uniform"             # tune on this variant alone; every variant takes its lrs

Every variant × strategy runs every lr of the grid on that seed, judged by the final metric on
the validation split (``validation_METRIC``: the study's ``set`` must give ``data.validation``,
which every run then scores beside the test split; the choice never reads the test split), and
its best lr then runs on every seed as the variant ``NAME-tuned``, beside the fixed-lr variant
``NAME``, with the same tables, differences and curves. A cell whose config equals one already
run in the study (a tuned lr that is the config's own; the tuned cell on the tuning seed, which
is its tuning run) is not run twice. A budget that does not fit one study splits in two: a
tuning study (``only = true``), and a seeds study whose ``results`` names the tuning study's
JSON, which also lists every tuning run's folder: a seeds cell equal to one reuses it.

Every run is ``fedlora run`` (:func:`fedlora.experiment.run_experiment`) in
``WORKDIR/VARIANT/STRATEGY/seed-S``; a run whose folder already holds a summary of the same
config is reused, so a stopped study continues where it stopped. The results go to
``OUT/NAME.json`` (with the git commit, every config and library versions), ``OUT/NAME.md`` and
``OUT/NAME.png``.

The decision rule: two strategies on the same seed share the partitions, ranks, client samples
and held-out set, so they are compared seed by seed, and a difference is **decided** when a
two-sided paired t-test over the seeds rejects "no difference" at 95 % (``p < 0.05`` with
``n − 1`` degrees of freedom: with 3 seeds the mean must exceed 4.30 standard errors, with 6
seeds 2.57); never with fewer than two seeds. The same rule for every comparison. (Until
2026-12-06 the tables marked "larger than the spread": every seed the same sign and the mean above
one standard deviation, a one-sided ``p`` of about 0.11 with 3 seeds; the JSON keeps that flag
as ``beyond_spread``.) The stricter "ranges disjoint" also holds when every seed of one beats
every seed of the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.bench.provenance import provenance
from fedlora.config import (
    RunConfig,
    config_from_json,
    load_config,
    read_toml,
    to_dict,
)
from fedlora.errors import ConfigError
from fedlora.lora import update_norm
from fedlora.report import higher_is_better

SUMMARY_EXTRAS = ("privacy", "rank_sum_before", "rank_sum_after", "adapter_ranks")
"""Run summary entries a study's JSON keeps per run besides the metrics and traffic."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: list[str]
    strategies: list[str]
    strategy_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Settings of one strategy only, after ``overrides`` (a tuned variant's learning rates)."""


@dataclass(frozen=True)
class Tune:
    """A study's ``[tune]`` section: each strategy's lr chosen from ``lrs`` on one seed by the
    final ``metric`` on the validation split."""

    lrs: list[float]
    seed: int
    metric: str
    fixed: bool = True
    """Also run every variant at the config's own lr (the fixed-lr table)."""
    only: bool = False
    """Run the grid and report it, nothing else (a tuning study of its own)."""
    results: tuple[Path, ...] | None = None
    """Take the best lrs from these tuning studies' JSON instead of running a grid; each
    strategy's from the first file that tuned it (a rerun of some methods, say, beside the
    study that tuned the rest)."""
    variant: str | None = None
    """Tune on this variant alone; every variant's strategies then run at its best lrs (each
    method tuned once, where the variants differ only by, say, the rank distribution)."""

    def tuned_on(self, variant: str) -> str:
        """The variant whose tuning gives ``variant``'s lrs."""
        return self.variant or variant


TUNED_SUFFIX = "-tuned"


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    config: Path | None
    overrides: list[str]
    gpu_overrides: list[str]
    seeds: list[int]
    metrics: list[str]
    reference: str | None
    variants: list[Variant]
    reference_variant: str | None = None
    notes: str = ""
    source: Path | None = None
    tune: Tune | None = None
    against_bytes: bool = False
    """Also plot each metric against the cumulative bytes up and down (``NAME-bytes.png``)."""

    def run_config(
        self, variant: Variant, strategy: str, seed: int, extra: Sequence[str] = ()
    ) -> RunConfig:
        """The config of one cell: base config, study and variant overrides (and the variant's
        for this strategy), GPU overrides when a GPU is present, ``extra`` (the command line's),
        then strategy and seed."""
        sets = [*self.overrides, *variant.overrides, *variant.strategy_overrides.get(strategy, [])]
        if _has_gpu():
            sets += self.gpu_overrides
        sets += [*extra, f"strategy={strategy}", f"seed={seed}"]
        return load_config(self.config, sets)

    def tune_config(
        self, variant: Variant, strategy: str, lr: float, extra: Sequence[str] = ()
    ) -> RunConfig:
        """The config of one tuning run: the cell's on the tuning seed, at ``lr``. It is the
        config of that seed's cell at that lr, so a tuned cell on the tuning seed is the tuning
        run itself; the choice reads only the run's validation scores (:func:`tuning_key`)."""
        assert self.tune is not None
        sets = [*extra, f"train.lr={lr!r}"]
        return self.run_config(variant, strategy, self.tune.seed, sets)


def tuning_key(cfg: RunConfig, metric: str) -> str:
    """The per-round metric a tuning run of ``cfg`` is judged by: ``metric`` on the validation
    split (``validation_METRIC``, or ``METRIC`` itself when the run scores that split alone,
    ``eval.split = "validation"``); a ConfigError when ``cfg`` has no validation split."""
    from fedlora.federation import VALIDATION

    if cfg.data.validation == 0:
        raise ConfigError(
            "[tune] chooses by the validation split, and the study's runs have none: set "
            "data.validation to the number of examples to split off (e.g. data.validation=32)"
        )
    return metric if cfg.eval.split == "validation" else f"{VALIDATION}_{metric}"


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _strings(raw: dict[str, Any], key: str, where: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
    return list(value)


def load_study(path: Path) -> Study:
    """Read and check a study file; every cell's config is built once, so a bad key fails
    before any run starts."""
    raw = read_toml(path)
    where = str(path)
    known = {"name", "title", "config", "set", "gpu_set", "seeds", "metrics", "reference",
             "reference_variant", "variant", "notes", "tune", "against_bytes"}  # fmt: skip
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected one of {sorted(known)}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ConfigError(f"{where}: name must be a non-empty string")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    variants = []
    for i, v in enumerate(raw.get("variant", [])):
        vwhere = f"{where}: variant {i + 1}"
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise ConfigError(f"{vwhere}: needs a name")
        extra = sorted(set(v) - {"name", "set", "strategies"})
        if extra:
            raise ConfigError(f"{vwhere}: unknown key {extra[0]!r}; expected name, set, strategies")
        strategies = _strings(v, "strategies", vwhere)
        if not strategies:
            raise ConfigError(f"{vwhere}: strategies must list at least one strategy")
        variants.append(Variant(v["name"], _strings(v, "set", vwhere), strategies))
    if not variants:
        raise ConfigError(f"{where}: needs at least one [[variant]]")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: variant names repeat: {names}")
    if raw.get("reference_variant") not in (None, *names):
        raise ConfigError(
            f"{where}: reference_variant {raw['reference_variant']!r} is not a variant ({names})"
        )
    config = raw.get("config")
    metrics = _strings(raw, "metrics", where) or ["loss"]
    by_name = {v.name: v.strategies for v in variants}
    tune = (
        _tune(raw["tune"], seeds, metrics, by_name, where, path.parent) if "tune" in raw else None
    )
    study = Study(
        name=raw["name"],
        title=str(raw.get("title", raw["name"])),
        config=(path.parent / config).resolve() if config else None,
        overrides=_strings(raw, "set", where),
        gpu_overrides=_strings(raw, "gpu_set", where),
        seeds=seeds,
        metrics=metrics,
        reference=raw.get("reference"),
        reference_variant=raw.get("reference_variant"),
        variants=variants,
        notes=str(raw.get("notes", "")),
        source=path,
        tune=tune,
        against_bytes=_flag(raw, "against_bytes", where),
    )
    return study


def _flag(raw: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _tune(
    raw: Any,
    seeds: list[int],
    metrics: list[str],
    variants: dict[str, list[str]],
    where: str,
    folder: Path,
) -> Tune:
    where = f"{where}: [tune]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    keys = ["lrs", "seed", "metric", "fixed", "only", "results", "variant"]
    extra = sorted(set(raw) - set(keys))
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; expected {', '.join(keys)}")
    seed = raw.get("seed", seeds[0])
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: seed must be an integer, got {seed!r}")
    metric = raw.get("metric", metrics[0])
    if metric not in metrics:
        raise ConfigError(f"{where}: metric {metric!r} is not one of the study's metrics {metrics}")
    fixed = _flag(raw, "fixed", where, default=True)
    only = _flag(raw, "only", where)
    variant = raw.get("variant")
    if variant is not None and "results" not in raw and variant not in variants:
        raise ConfigError(f"{where}: variant {variant!r} is not a variant ({list(variants)})")
    tuned = variants.get(variant, []) if variant is not None else []
    for name, strategies in variants.items() if variant in variants else []:
        missing = [s for s in strategies if s not in tuned]
        if missing:
            raise ConfigError(
                f"{where}: variant {name!r} runs {missing[0]!r}, which the tuned variant "
                f"{variant!r} does not tune"
            )
    if "results" in raw:
        named = raw["results"]
        paths = [named] if isinstance(named, str) else named
        if (
            not isinstance(paths, list)
            or not paths
            or not all(isinstance(x, str) for x in paths)
            or only
            or "lrs" in raw
        ):
            raise ConfigError(
                f"{where}: results names a tuning study's JSON (a path, or a list of paths), and "
                "goes without lrs and only"
            )
        results = tuple((folder / x).resolve() for x in paths)
        return Tune([], seed, metric, fixed, only, results, variant)
    lrs = raw.get("lrs")
    if (
        not isinstance(lrs, list)
        or len(set(lrs)) < 2
        or not all(isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in lrs)
    ):
        raise ConfigError(f"{where}: lrs must list at least two distinct lrs > 0, got {lrs!r}")
    return Tune([float(x) for x in dict.fromkeys(lrs)], seed, metric, fixed, only, None, variant)


def _read_tuning(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"[tune] results {path}: cannot read a study's JSON: {exc}") from exc
    tuning = payload.get("tuning") if isinstance(payload, dict) else None
    if not isinstance(tuning, dict) or not tuning:
        raise ConfigError(f"[tune] results {path}: holds no lr tuning (run its study first)")
    return tuning


def tuning_from(study: Study, paths: Sequence[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """The lr tuning the tuning studies wrote to their JSON ``paths``, for every variant and
    strategy of ``study``, each strategy's from the first file that tuned it (a ConfigError names
    the files and what they lack)."""
    tunings = [_read_tuning(path) for path in paths]
    assert study.tune is not None
    on = {v.name: study.tune.tuned_on(v.name) for v in study.variants}
    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in dict.fromkeys(on.values())}
    for v in study.variants:
        for s in v.strategies:
            found = [
                t[on[v.name]][s] for t in tunings if "best" in t.get(on[v.name], {}).get(s, {})
            ]
            if not found:
                files = ", ".join(str(p) for p in paths)
                raise ConfigError(
                    f"[tune] results {files}: no tuned lr for variant {on[v.name]!r}, "
                    f"strategy {s!r}"
                )
            out[on[v.name]][s] = found[0]
    return out


def with_seeds(study: Study, seeds: Sequence[int] | None) -> Study:
    return dataclasses.replace(study, seeds=list(seeds)) if seeds else study


@dataclass
class Cell:
    variant: str
    strategy: str
    seed: int
    summary: dict[str, Any]
    seconds: float
    reused: bool
    update_norm: float | None = None
    """``‖ΔW‖_F`` over all modules of the run's exported adapter: the whole update the global
    model carries (for FLoRA every merged update), None without an adapter (standalone)."""

    def final(self, metric: str) -> float | None:
        return _final(self.summary, metric)

    def record(self, metrics: Sequence[str]) -> dict[str, Any]:
        """The cell as the study's JSON keeps it (what :func:`differences_at_bytes` reads)."""
        return {
            "variant": self.variant,
            "strategy": self.strategy,
            "seed": self.seed,
            "final": {m: self.final(m) for m in metrics},
            "seconds": self.seconds,
            "reused": self.reused,
            "update_norm": self.update_norm,
            "per_round": self.summary.get("per_round", {}),
            "communication": self.summary.get("communication", {}),
            "cumulative_bytes": self.summary.get("cumulative_bytes", {}),
            **{k: self.summary[k] for k in SUMMARY_EXTRAS if k in self.summary},
        }


@dataclass
class StudyResult:
    study: Study
    """As run: with a ``[tune]`` section, its variants are the fixed-lr ones (``fixed``) and the
    tuned ones (``NAME-tuned``)."""
    cells: list[Cell] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    tuning: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Per variant, per strategy: ``scores`` (lr → final validation metric, None if it had
    none), ``best`` (the lr kept) and ``metric``."""


def run_study(
    study: Study,
    workdir: Path,
    extra: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run every cell of ``study`` not already done in ``workdir`` (after its lr tuning, if it
    has a ``[tune]`` section); the cells' summaries. Every config, tuning runs included, is
    built before the first run starts, so a bad setting stops the study at once."""
    start = time.perf_counter()
    runs = _Runs(workdir, progress)
    tuning: dict[str, dict[str, dict[str, Any]]] = {}
    if study.tune is not None and study.tune.results is not None:
        tuning = tuning_from(study, study.tune.results)
        study = _with_tuned_variants(study, tuning)
        runs.elsewhere = [
            Path(f)
            for per in tuning.values()
            for e in per.values()
            for f in e.get("runs", {}).values()
        ]
    elif study.tune is not None:
        tune = study.tune
        grid = [
            (v, s, lr, study.tune_config(v, s, lr, extra))
            for v in study.variants
            if tune.tuned_on(v.name) == v.name
            for s in v.strategies
            for lr in tune.lrs
        ]
        _plan(study, extra)  # the fixed-lr cells' configs, built (checked) before any run
        keys = [tuning_key(cfg, tune.metric) for *_, cfg in grid]
        runs.total = len(grid)
        for (variant, strategy, lr, cfg), key in zip(grid, keys, strict=True):
            label = f"tune/{variant.name}/{strategy}/lr-{lr!r}"
            summary, (out, _) = runs.run(label, cfg)
            entry = tuning.setdefault(variant.name, {}).setdefault(
                strategy, {"metric": tune.metric, "scores": {}, "runs": {}, "seconds": {}}
            )
            entry["scores"][repr(lr)] = _final(summary, key)
            entry["runs"][repr(lr)] = str(out)
            entry["seconds"][repr(lr)] = float(summary.get("seconds", 0.0))
        for per in tuning.values():
            for entry in per.values():
                entry["best"] = best_lr(entry["scores"], entry["metric"])
        if tune.only:
            return StudyResult(study, tuning=tuning, seconds=time.perf_counter() - start)
        study = _with_tuned_variants(study, tuning)
    plan = _plan(study, extra)
    result = StudyResult(study, tuning=tuning)
    runs.done, runs.total = 0, len(plan)
    for variant, strategy, seed, cfg in plan:
        label = f"{variant.name}/{strategy}/seed-{seed}"
        result.configs[label] = to_dict(cfg)
        t0 = time.perf_counter()
        summary, (out, reused) = runs.run(label, cfg)
        seconds = float(summary.get("seconds", time.perf_counter() - t0))
        norm = adapter_update_norm(out / "adapter")
        result.cells.append(Cell(variant.name, strategy, seed, summary, seconds, reused, norm))
    result.seconds = time.perf_counter() - start
    return result


def _plan(study: Study, extra: Sequence[str]) -> list[tuple[Variant, str, int, RunConfig]]:
    """Every cell of ``study`` with its config (built, so checked)."""
    return [
        (v, s, seed, study.run_config(v, s, seed, extra))
        for v in study.variants
        for s in v.strategies
        for seed in study.seeds
    ]


class _Runs:
    """Runs configs in ``workdir/LABEL``, reusing a finished run there, an earlier run of an
    identical config within one study, or a finished run of it in one of the ``elsewhere``
    folders (the runs of the tuning study a seeds study takes its lrs from)."""

    def __init__(self, workdir: Path, progress: Callable[[str], None] | None) -> None:
        self.workdir, self.progress = workdir, progress
        self.by_config: dict[str, tuple[Path, dict[str, Any]]] = {}
        self.elsewhere: list[Path] = []
        self.done, self.total = 0, 0

    def run(self, label: str, cfg: RunConfig) -> tuple[dict[str, Any], tuple[Path, bool]]:
        """The run's summary, its folder and whether it was reused rather than run."""
        from fedlora.experiment import run_experiment

        self.done += 1
        key = json.dumps(to_dict(cfg), sort_keys=True)
        if key in self.by_config:
            out, summary = self.by_config[key]
            return summary, (out, True)
        out = self.workdir / label
        finished = _done(out, cfg)
        for folder in self.elsewhere if finished is None else []:
            finished = _done(folder, cfg)
            if finished is not None:
                out = folder
                break
        if finished is None:
            if self.progress:
                self.progress(f"[{self.done}/{self.total}] {label}")
            summary = run_experiment(cfg, out, progress=False)
        else:
            summary = finished
        self.by_config[key] = (out, summary)
        return summary, (out, finished is not None)


def _final(summary: dict[str, Any], metric: str) -> float | None:
    points = summary.get("per_round", {}).get(metric, {})
    return float(points[max(points, key=int)]) if points else None


def best_lr(scores: dict[str, float | None], metric: str) -> str:
    """The lr (as written in ``scores``) with the best score; a tie goes to the smaller lr, a
    run without a score (diverged: NaN, or none) never wins unless none has one."""
    higher = higher_is_better(metric)
    ranked = [
        (-(v if higher else -v), float(lr), lr)
        for lr, v in scores.items()
        if v is not None and math.isfinite(v)
    ]
    if not ranked:
        return min(scores, key=float)
    return min(ranked)[2]


def _with_tuned_variants(study: Study, tuning: dict[str, dict[str, dict[str, Any]]]) -> Study:
    """``study`` with, after each variant (kept if ``tune.fixed``), its ``NAME-tuned`` twin
    whose strategies run at their best lr."""
    assert study.tune is not None
    variants = []
    for v in study.variants:
        if study.tune.fixed:
            variants.append(v)
        lrs = {}
        for s in v.strategies:
            lrs[s] = [f"train.lr={tuning[study.tune.tuned_on(v.name)][s]['best']}"]
        variants.append(Variant(v.name + TUNED_SUFFIX, v.overrides, v.strategies, lrs))
    reference_variant = study.reference_variant
    if reference_variant is not None and not study.tune.fixed:
        reference_variant += TUNED_SUFFIX
    return dataclasses.replace(study, variants=variants, reference_variant=reference_variant)


def _done(out: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished run of ``cfg`` in ``out``, or None. A run of the same config in
    another compute dtype is not reused: ``model.dtype = "auto"`` is bfloat16 on one CPU and
    float32 on another, and a study resumed on another machine must not mix them."""
    try:
        summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
        ran = config_from_json((out / "config.json").read_text(), str(out / "config.json"))
    except (OSError, json.JSONDecodeError, ConfigError):
        return None
    if to_dict(ran) != to_dict(cfg):
        return None
    return summary if summary.get("dtype", _dtype_now(cfg)) == _dtype_now(cfg) else None


def _dtype_now(cfg: RunConfig) -> str:
    """The compute dtype a run of ``cfg`` gets on this machine."""
    from fedlora.devices import resolve_device
    from fedlora.precision import dtype_name, resolve_dtype

    return dtype_name(resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device)))


def adapter_update_norm(folder: Path) -> float | None:
    """``‖ΔW‖_F`` over all modules (``√Σ_m ‖B_m A_m‖²``, from the factors) of the adapter a run
    exported to ``folder``; None when the run exported none."""
    from fedlora.adapters import read_adapter

    if not (folder / "adapter_config.json").is_file():
        return None
    return math.sqrt(sum(update_norm(f) ** 2 for f in read_adapter(folder).values()))


# --- statistics ------------------------------------------------------------------------------


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


# --- report ----------------------------------------------------------------------------------


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

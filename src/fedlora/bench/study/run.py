"""Running a study: the lr tuning (or the tuned lrs a tuning study wrote), then every cell, reusing
any finished run of the same config in the same compute dtype."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.bench.study.spec import TUNED_SUFFIX, Study, Variant, tuning_key
from fedlora.config import RunConfig, config_from_json, to_dict
from fedlora.errors import ConfigError
from fedlora.lora import update_norm
from fedlora.report import higher_is_better

SUMMARY_EXTRAS = ("privacy", "rank_sum_before", "rank_sum_after", "adapter_ranks")
"""Run summary entries a study's JSON keeps per run besides the metrics and traffic."""


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
    here = _dtype_now(cfg)
    return summary if summary.get("dtype", here) == here else None


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

"""A study file: its schema (:class:`Study`, :class:`Variant`, :class:`Tune`), read and checked
before any run starts, and each cell's run config."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, load_config, read_toml
from fedlora.errors import ConfigError


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


def with_seeds(study: Study, seeds: Sequence[int] | None) -> Study:
    return dataclasses.replace(study, seeds=list(seeds)) if seeds else study

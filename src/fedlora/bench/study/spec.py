"""A study file: its schema (:class:`Study`, :class:`Variant`, :class:`Tune`), read and checked
before any run starts, and each cell's run config."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, build, load_config, read_toml
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


@dataclass
class VariantFile:
    """A ``[[variant]]`` of a study file, as written."""

    name: str = ""
    set: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)


@dataclass
class TuneFile:
    """A study file's ``[tune]`` section, as written (:class:`Tune` is what it resolves to)."""

    lrs: list[float] | None = None
    seed: int | None = None
    """Default: the study's first seed."""
    metric: str | None = None
    """Default: the study's first metric."""
    fixed: bool = True
    only: bool = False
    results: str | list[str] | None = field(
        default=None, metadata={"expects": "a tuning study's JSON (a path, or a list of paths)"}
    )
    variant: str | None = None


@dataclass
class StudyFile:
    """A study file, as written: the keys, their types and defaults; :func:`load_study` builds it
    with the run config's own machinery (:func:`fedlora.schema.build`), then checks what types
    cannot say and resolves it to a :class:`Study`."""

    name: str = ""
    title: str | None = None
    """Default: the name."""
    config: str | None = None
    """The base run config, relative to the study file (None: the defaults)."""
    set: list[str] = field(default_factory=list)
    """``--set`` overrides for every run."""
    gpu_set: list[str] = field(default_factory=list)
    """More overrides where a GPU is present."""
    seeds: list[int] = field(default_factory=lambda: [0])
    metrics: list[str] = field(default_factory=list)
    """Default: ``["loss"]``."""
    reference: str | None = None
    reference_variant: str | None = None
    notes: str = ""
    against_bytes: bool = False
    tune: dict[str, Any] | None = None
    """A :class:`TuneFile`, built by :func:`load_study` to name its errors ``[tune]``."""
    variant: list[dict[str, Any]] = field(default_factory=list)
    """:class:`VariantFile` s, built by :func:`load_study` to name each one's errors."""


def _built(cls: type[Any], raw: Any, where: str, scope: str) -> Any:
    """``cls`` built from ``raw``, its errors naming ``where`` (the file, and the section)."""
    try:
        return build(cls, raw, "", noun="key", scope=scope)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_study(path: Path) -> Study:
    """Read and check a study file; every cell's config is built once, so a bad key fails
    before any run starts."""
    where = str(path)
    raw: StudyFile = _built(StudyFile, read_toml(path), where, "a study file")
    if not raw.name:
        raise ConfigError(f"{where}: name must be a non-empty string")
    if not raw.seeds:
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {raw.seeds!r}")
    variants = []
    for i, v in enumerate(raw.variant):
        vwhere = f"{where}: variant {i + 1}"
        vfile: VariantFile = _built(VariantFile, v, vwhere, "a [[variant]]")
        if not vfile.name:
            raise ConfigError(f"{vwhere}: needs a name")
        if not vfile.strategies:
            raise ConfigError(f"{vwhere}: strategies must list at least one strategy")
        variants.append(Variant(vfile.name, vfile.set, vfile.strategies))
    if not variants:
        raise ConfigError(f"{where}: needs at least one [[variant]]")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: variant names repeat: {names}")
    if raw.reference_variant not in (None, *names):
        raise ConfigError(
            f"{where}: reference_variant {raw.reference_variant!r} is not a variant ({names})"
        )
    metrics = raw.metrics or ["loss"]
    by_name = {v.name: v.strategies for v in variants}
    tune = None
    if raw.tune is not None:
        tfile: TuneFile = _built(TuneFile, raw.tune, f"{where}: [tune]", "[tune]")
        tune = _tune(tfile, raw.seeds, metrics, by_name, f"{where}: [tune]", path.parent)
    return Study(
        name=raw.name,
        title=raw.title or raw.name,
        config=(path.parent / raw.config).resolve() if raw.config else None,
        overrides=raw.set,
        gpu_overrides=raw.gpu_set,
        seeds=raw.seeds,
        metrics=metrics,
        reference=raw.reference,
        reference_variant=raw.reference_variant,
        variants=variants,
        notes=raw.notes,
        source=path,
        tune=tune,
        against_bytes=raw.against_bytes,
    )


def _tune(
    raw: TuneFile,
    seeds: list[int],
    metrics: list[str],
    variants: dict[str, list[str]],
    where: str,
    folder: Path,
) -> Tune:
    seed = seeds[0] if raw.seed is None else raw.seed
    metric = raw.metric or metrics[0]
    if metric not in metrics:
        raise ConfigError(f"{where}: metric {metric!r} is not one of the study's metrics {metrics}")
    variant = raw.variant
    if variant is not None and raw.results is None and variant not in variants:
        raise ConfigError(f"{where}: variant {variant!r} is not a variant ({list(variants)})")
    tuned = variants.get(variant, []) if variant is not None else []
    for name, strategies in variants.items() if variant in variants else []:
        missing = [s for s in strategies if s not in tuned]
        if missing:
            raise ConfigError(
                f"{where}: variant {name!r} runs {missing[0]!r}, which the tuned variant "
                f"{variant!r} does not tune"
            )
    if raw.results is not None:
        paths = [raw.results] if isinstance(raw.results, str) else raw.results
        if not paths or raw.only or raw.lrs is not None:
            raise ConfigError(
                f"{where}: results names a tuning study's JSON (a path, or a list of paths), and "
                "goes without lrs and only"
            )
        results = tuple((folder / x).resolve() for x in paths)
        return Tune([], seed, metric, raw.fixed, raw.only, results, variant)
    lrs = raw.lrs
    if lrs is None or len(set(lrs)) < 2 or not all(x > 0 for x in lrs):
        raise ConfigError(f"{where}: lrs must list at least two distinct lrs > 0, got {lrs!r}")
    return Tune(list(dict.fromkeys(lrs)), seed, metric, raw.fixed, raw.only, None, variant)


def with_seeds(study: Study, seeds: Sequence[int] | None) -> Study:
    return dataclasses.replace(study, seeds=list(seeds)) if seeds else study

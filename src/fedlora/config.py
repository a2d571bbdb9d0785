"""A run's configuration, loaded and checked: TOML file → dataclasses (:mod:`fedlora.schema`) →
``--set`` overrides → range and cross-section checks, before anything slow starts.

This module sits above the methods (:mod:`fedlora.methods`, imported here so that every method's
option section is registered before a config is read); the schema below them imports none.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError
from fedlora.methods import REGISTRY, hook_for  # importing the methods registers their options
from fedlora.schema import (
    METHOD_OPTIONS,
    SINGLE_PARTY,
    ClientsConfig,
    DataConfig,
    EvalConfig,
    FaultsConfig,
    FlowerConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    build,
    coerce,
    default_method_options,
    drop_none,
    method_options,
    options_of,
    parse_override,
    read_toml,
    set_dotted,
    to_dict,
)
from fedlora.strategies.base import check_trim

__all__ = [
    "LOGGERS",
    "METHOD_OPTIONS",
    "SINGLE_PARTY",
    "ClientsConfig",
    "DataConfig",
    "EvalConfig",
    "FaultsConfig",
    "FlowerConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TrainConfig",
    "ValidationConfig",
    "build",
    "check",
    "coerce",
    "config_from_json",
    "config_with",
    "default_method_options",
    "load_config",
    "method_options",
    "options_of",
    "parse_override",
    "read_toml",
    "to_dict",
]


LOGGERS = {"tensorboard": "tensorboard"}
"""The per-round loggers ``log`` may name, and the package each needs."""


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (TOML; None: defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    config: RunConfig = build(RunConfig, raw, "")
    check(config)
    return config


def config_from_json(text: str, where: str) -> RunConfig:
    """A resolved config from the JSON :func:`to_dict` wrote (``where`` names it in errors)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    config: RunConfig = build(RunConfig, drop_none(raw), "")
    check(config)
    return config


def config_with(config: RunConfig, overrides: list[str], where: str = "") -> RunConfig:
    """``config`` with ``key=value`` overrides applied, checked as a loaded config is."""
    raw = drop_none(to_dict(config))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    changed: RunConfig = build(RunConfig, raw, where)
    check(changed)
    return changed


def check(config: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    from fedlora.models import resolve_device
    from fedlora.precision import resolve_attention, resolve_dtype

    _allowed("strategy", config.strategy, [*sorted(REGISTRY), *SINGLE_PARTY])
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    resolve_attention(config.model.attention, device, dtype, config.model.max_length)
    _allowed("weighting", config.weighting, ["examples", "uniform", "custom"])
    for logger in config.log:
        _allowed("log", logger, list(LOGGERS))
        if importlib.util.find_spec(LOGGERS[logger]) is None:
            raise ConfigError(
                f"log = [{logger!r}] needs the package {LOGGERS[logger]}: "
                f"pip install 'fedlora[{logger}]'"
            )
    weights = config.clients.weights
    if (config.weighting == "custom") != (weights is not None):
        raise ConfigError(
            'weighting = "custom" and clients.weights go together: give both or neither'
        )
    if weights is not None and (not weights or min(weights) <= 0):
        raise ConfigError(f"clients.weights must be positive numbers, got {weights}")
    _allowed("data.partition", config.data.partition, ["iid", "dirichlet", "classes", "task"])
    for key, value, low in [
        ("rounds", config.rounds, 1),
        ("clients.num_clients", config.clients.num_clients, 1),
        ("train.steps", config.train.steps, 1),
        ("train.batch_size", config.train.batch_size, 1),
        ("train.grad_accum", config.train.grad_accum, 1),
        ("train.fuse_tokens", config.train.fuse_tokens, 1),
        ("model.max_length", config.model.max_length, 8),
        ("data.heldout", config.data.heldout, 1),
        ("eval.batch_size", config.eval.batch_size, 1),
        ("eval.every", config.eval.every, 1),
    ]:
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if config.eval.benchmark is not None and config.eval.benchmark == config.data.source:
        raise ConfigError(
            f"eval.benchmark is {config.eval.benchmark!r}, the training source itself; "
            "data.heldout already scores held-out examples of it"
        )
    if config.eval.benchmark_examples < 1:
        raise ConfigError(
            f"eval.benchmark_examples must be >= 1, got {config.eval.benchmark_examples}"
        )
    _allowed("eval.split", config.eval.split, ["heldout", "validation"])
    if config.data.heldout_categories < 0:
        raise ConfigError(
            f"data.heldout_categories must be >= 0, got {config.data.heldout_categories}"
        )
    if config.data.validation < 0:
        raise ConfigError(f"data.validation must be >= 0, got {config.data.validation}")
    if config.eval.split == "validation" and config.data.validation == 0:
        raise ConfigError(
            'eval.split = "validation" needs a validation split: set data.validation to the '
            "number of examples to split off the training pool"
        )
    if not 0 < config.clients.fraction <= 1:
        raise ConfigError(f"clients.fraction must be in (0, 1], got {config.clients.fraction}")
    if config.train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {config.train.lr}")
    if isinstance(config.clients.ranks, list) and (
        not config.clients.ranks or min(config.clients.ranks) < 1
    ):
        raise ConfigError(f"clients.ranks must be ranks >= 1, got {config.clients.ranks}")
    for options in config.methods.values():
        if hasattr(options, "check"):
            options.check()
    _check_faults(config)
    _check_privacy(config)
    if config.export_rank is not None and config.export_rank < 1:
        raise ConfigError(f"export_rank must be >= 1, got {config.export_rank}")
    _check_rank_mix(config)
    _check_quantization(config)


def _check_faults(config: RunConfig) -> None:
    c, f = config.clients, config.faults
    if not 1 <= c.min_clients <= c.num_clients:
        raise ConfigError(
            f"clients.min_clients must be in 1 … clients.num_clients = {c.num_clients}, "
            f"got {c.min_clients}"
        )
    sampled = max(1, round(c.fraction * c.num_clients))
    if c.min_clients > sampled:
        raise ConfigError(
            f"clients.min_clients = {c.min_clients} is more than the {sampled} clients sampled "
            "per round (clients.fraction × clients.num_clients); no round could aggregate"
        )
    if c.retries < 0:
        raise ConfigError(f"clients.retries must be >= 0, got {c.retries}")
    probs = {
        "faults.crash_before": f.crash_before,
        "faults.crash_after": f.crash_after,
        "faults.timeout": f.timeout,
        "faults.straggler": f.straggler,
    }
    for key, p in probs.items():
        if not 0 <= p <= 1:
            raise ConfigError(f"{key} must be a probability in [0, 1], got {p}")
    if sum(probs.values()) > 1:
        raise ConfigError(
            f"the fault probabilities sum to {sum(probs.values()):g}; they are exclusive "
            "outcomes and must sum to at most 1"
        )
    if config.flower.wait_nodes_s <= 0 or config.flower.round_timeout_s <= 0:
        raise ConfigError(
            "flower.wait_nodes_s and flower.round_timeout_s must be > 0 seconds, got "
            f"{config.flower.wait_nodes_s} and {config.flower.round_timeout_s}"
        )
    # the simulation engine's client resources are amounts Ray can schedule; whether this
    # machine has the GPUs is checked where the simulation starts (launch.simulation_options):
    # every Flower process checks the config again, and a ClientApp given no GPU sees none
    gpus = config.flower.client_gpus
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise ConfigError(
            "flower.client_gpus must be >= 0, and a whole number above 1 (Ray shares a GPU "
            f"only in fractions of one), got {gpus}"
        )
    if config.flower.clients_per_gpu < 1:
        raise ConfigError(
            f"flower.clients_per_gpu must be >= 1, got {config.flower.clients_per_gpu}"
        )
    if config.flower.client_cpus is not None and config.flower.client_cpus < 1:
        raise ConfigError(f"flower.client_cpus must be >= 1, got {config.flower.client_cpus}")
    v = config.validation
    if v.max_norm is not None and not v.max_norm > 0:
        raise ConfigError(f"validation.max_norm must be > 0, got {v.max_norm}")
    if v.max_examples is not None and v.max_examples < 1:
        raise ConfigError(f"validation.max_examples must be >= 1, got {v.max_examples}")
    for key, ratio in (("norm_ratio", v.norm_ratio), ("weight_ratio", v.weight_ratio)):
        if ratio is not None and not ratio >= 1:
            raise ConfigError(f"validation.{key} must be >= 1 (or none: off), got {ratio}")
    federated = config.mode == "federated"
    check_trim(v.trim, config.strategy, REGISTRY[config.strategy].traits if federated else None)
    if not 0 < f.straggler_work <= 1:
        raise ConfigError(f"faults.straggler_work must be in (0, 1], got {f.straggler_work}")


def _check_privacy(config: RunConfig) -> None:
    """Privacy needs a clip norm with its noise, and a strategy whose uploads are all noised."""

    p = config.privacy
    if p.clip_norm < 0 or p.noise_multiplier < 0:
        raise ConfigError(
            "privacy.clip_norm and privacy.noise_multiplier must be >= 0, got "
            f"{p.clip_norm} and {p.noise_multiplier}"
        )
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta}")
    if p.clip_norm == 0:
        if p.noise_multiplier > 0:
            raise ConfigError(
                "privacy.noise_multiplier is set but privacy.clip_norm is 0; the noise is "
                "σ × clip_norm, so set privacy.clip_norm too"
            )
        return
    if config.mode in SINGLE_PARTY:
        raise ConfigError(
            f"privacy applies to what clients send; mode {config.mode!r} sends nothing"
        )
    sends = hook_for(config.strategy).also_sends
    if sends is not None:
        raise ConfigError(
            f"privacy is not available with strategy {config.strategy!r}: its clients also "
            f"send {sends} computed from their data, which the noise does not cover"
        )


def _check_quantization(config: RunConfig) -> None:
    """Every client's quantization is known, its backend installed, and the strategy federated
    (centralized and standalone train on the server's model)."""
    from fedlora.models import QUANTIZATIONS

    used = set(config.clients.quantization) - {"none"}
    for q in config.clients.quantization:
        _allowed("clients.quantization", q, list(QUANTIZATIONS))
    if not used:
        return
    if config.mode in SINGLE_PARTY:
        raise ConfigError(
            f"clients.quantization is for federated clients; {config.mode!r} trains on the "
            "server's full-precision model"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"clients.quantization {sorted(used)} needs the package bitsandbytes: "
            "pip install 'fedlora[quantization]'"
        )


def _check_rank_mix(config: RunConfig) -> None:
    """The ranks resolve (a misspelled distribution or a bad ``rank_set`` is found here, for
    every strategy), and a strategy that needs equal ranks (FedIT) is not given mixed ones."""
    from fedlora.ranks import client_ranks

    c = config.clients
    ranks = client_ranks(c.ranks, c.num_clients, c.rank_set, config.seed)
    if config.mode in SINGLE_PARTY or REGISTRY[config.strategy].traits.mixed_ranks:
        return
    if len(set(ranks)) > 1:
        raise ConfigError(
            f"strategy {config.strategy!r} needs every client at the same rank, but "
            f"clients.ranks gives {sorted(set(ranks))}; set e.g. clients.ranks=[{max(ranks)}]"
        )


def _allowed(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {', '.join(allowed)}")

"""flowertune-fedlora: the run config in FlowerTune's keys, as a fedlora config; data; model.

FlowerTune apps read ``model.*``, ``dataset.*``, ``train.*``, ``strategy.*`` and
``num-server-rounds`` from the run config. :func:`fedlora_config` maps those keys onto a fedlora
config, which the server's strategy runs by (and sends to every node with each message). Any
other fedlora setting goes into ``fedlora.set`` (``"model.dtype=float32 data.limit=200"``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

from fedlora.config import ModelConfig, RunConfig, load_config, to_dict
from fedlora.data import Example
from fedlora.flower.strategy import server_data
from fedlora.models import LoadedModel, load_configured

FLOWERTUNE_KEYS = {
    "model.name": "model.name",
    "model.gradient-checkpointing": "model.gradient_checkpointing",
    "model.lora.peft-lora-alpha": "clients.alpha",
    "dataset.name": "data.source",
    "dataset.partition": "data.partition",
    "dataset.heldout": "data.heldout",
    "train.seq-length": "model.max_length",
    "train.learning-rate": "train.lr",
    "train.max-steps": "train.steps",
    "train.per-device-train-batch-size": "train.batch_size",
    "strategy.name": "strategy",
    "strategy.fraction-train": "clients.fraction",
    "strategy.num-clients": "clients.num_clients",
    "num-server-rounds": "rounds",
    "seed": "seed",
}
"""FlowerTune run-config key → fedlora config key."""
LISTS = {"model.lora.peft-lora-r": "clients.ranks", "model.lora.target-modules": "model.targets"}
"""Run-config keys that hold a comma-separated list (a single rank is a list of one)."""
QUANTIZATION_KEY = "model.quantization"
"""FlowerTune's base quantization: 4 or 8 bits (bitsandbytes), 0 for none; fedlora's
``clients.quantization`` for every node (a SuperNode's node config ``quantization`` overrides
it)."""
QUANTIZATIONS = {0: [], 4: ["4bit"], 8: ["8bit"]}
SET_KEY = "fedlora.set"
"""Any other fedlora settings, as ``fedlora run --set`` takes them: ``key=value`` items
separated by spaces (``"model.dtype=float32 data.limit=200"``)."""
APP_KEYS = {"train.trainer", "save-path"}
"""This app's own keys, not fedlora's."""


def fedlora_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The fedlora config of a run config in FlowerTune's keys; an unknown key is an error."""
    return _config(json.dumps(dict(run_config), sort_keys=True))


@functools.lru_cache(maxsize=4)
def _config(text: str) -> RunConfig:
    overrides = []
    for key, value in json.loads(text).items():
        if key in APP_KEYS:
            continue
        if key in LISTS:
            parts = [p.strip() for p in str(value).split(",") if p.strip()]
            items = [int(p) if p.isdigit() else p for p in parts]
            overrides.append(f"{LISTS[key]}={json.dumps(items)}")
        elif key == QUANTIZATION_KEY:
            if isinstance(value, bool) or value not in QUANTIZATIONS:
                raise ValueError(f"run config {key} must be 0, 4 or 8 (bits), got {value!r}")
            overrides.append(f"clients.quantization={json.dumps(QUANTIZATIONS[value])}")
        elif key in FLOWERTUNE_KEYS:
            overrides.append(f"{FLOWERTUNE_KEYS[key]}={json.dumps(value)}")
        elif key == SET_KEY:
            overrides += str(value).split()
        else:
            known = sorted([*FLOWERTUNE_KEYS, *LISTS, *APP_KEYS, QUANTIZATION_KEY, SET_KEY])
            raise ValueError(f"run config key {key!r} is not one of {', '.join(known)}")
    return load_config(None, overrides)


def load_data(cfg: RunConfig, partition_id: int) -> list[Example]:
    """This node's partition of ``dataset.name``, split as fedlora splits it (flwr-datasets'
    partitioners; the held-out examples left out), once per process."""
    return list(server_data(json.dumps(to_dict(cfg), sort_keys=True)).parts[partition_id])


def get_model(cfg: RunConfig, quantization: str = "none") -> LoadedModel:
    """The base model without an adapter (the run attaches its own), held as ``quantization``
    says (``none``, ``8bit``, ``4bit``), once per process: fedlora's loader (the embedded default
    model without a hub; any hub id or local path)."""
    return _model(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), cfg.seed, quantization)


@functools.lru_cache(maxsize=1)
def _model(model_json: str, seed: int, quantization: str) -> LoadedModel:
    return load_configured(ModelConfig(**json.loads(model_json)), seed, quantization)

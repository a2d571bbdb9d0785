"""Run checkpoints: after every round, everything a run needs to go on, in one file.

``RUN_DIR/checkpoint.safetensors`` holds the tensors (global factors, base updates, importance,
the sampler's RNG state, …) and, as JSON in the file's metadata, the rest (round, ranks, metric
rows, …). It is written atomically: a temporary file in the same folder, ``fsync``, ``rename``
over the previous checkpoint, ``fsync`` of the folder; a crash at any moment leaves the previous
checkpoint or the new one, never a torn file. Loading reads safetensors only, never a pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fedlora.devices import to_host
from fedlora.errors import ConfigError
from fedlora.lora import BaseDelta, LoRAFactors

FILE = "checkpoint.safetensors"
KEY = "fedlora"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_checkpoint(
    folder: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) as ``folder/checkpoint.safetensors``."""
    data = save(  # clones: the state's tensors may be views of one another (truncations)
        {k: to_host(v).clone() for k, v in tensors.items()},
        metadata={KEY: json.dumps(meta)},
    )
    path = folder / FILE
    write_atomic(path, data)
    return path


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of ``folder``'s checkpoint; a clear error if there is none or
    it is not one fedlora wrote."""
    path = folder / FILE
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no {FILE}: only a run folder that finished at least one round can be "
            "resumed"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file: {exc}") from None
    if KEY not in metadata:
        raise ConfigError(f"{path} has no fedlora metadata; it was not written by fedlora")
    try:
        meta: dict[str, Any] = json.loads(metadata[KEY])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: its fedlora metadata is not valid JSON: {exc}") from None
    return tensors, meta


def put_deltas(
    tensors: dict[str, torch.Tensor], prefix: str, deltas: Mapping[str, BaseDelta]
) -> None:
    """Store factors (``PREFIX/MODULE/A``, ``/B``) or dense deltas (``PREFIX/MODULE/W``)."""
    for name, d in deltas.items():
        if isinstance(d, LoRAFactors):
            tensors[f"{prefix}/{name}/A"] = d.A
            tensors[f"{prefix}/{name}/B"] = d.B
        else:
            tensors[f"{prefix}/{name}/W"] = d


def take_deltas(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, BaseDelta]:
    """The inverse of :func:`put_deltas`."""
    out: dict[str, BaseDelta] = {}
    start = f"{prefix}/"
    names = sorted({k[len(start) :].rsplit("/", 1)[0] for k in tensors if k.startswith(start)})
    for name in names:
        base = f"{start}{name}/"
        if f"{base}W" in tensors:
            out[name] = tensors[f"{base}W"]
        else:
            out[name] = LoRAFactors(A=tensors[f"{base}A"], B=tensors[f"{base}B"])
    return out


def take_factors(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, LoRAFactors]:
    """:func:`take_deltas` where every entry must be factors."""
    out = {}
    for name, d in take_deltas(tensors, prefix).items():
        if not isinstance(d, LoRAFactors):
            raise ConfigError(f"checkpoint entry {prefix}/{name} is dense, expected factors")
        out[name] = d
    return out

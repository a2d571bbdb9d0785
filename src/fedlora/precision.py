"""The run's numeric precision: which dtype computes, and what is kept in float32 whatever it is.

A run computes in one *compute dtype* (``model.dtype``; ``auto`` picks bfloat16 where the
hardware multiplies it natively, float32 elsewhere). The rules (``docs/precision.md``):

- the frozen base weights are held and multiplied in the compute dtype;
- LoRA parameters, their gradients and AdamW's state are float32 (PEFT casts adapters of a
  bfloat16 / float16 model to float32), and so is every factor a client uploads;
- all aggregation math is float32 or float64 (:mod:`fedlora.strategies`);
- what a strategy merges into the base (FLoRA) accumulates in a float32 *master* of each merged
  weight, ``W₀ + Σ_t ΔW_t`` (:class:`MergedBase`); the compute copy is re-cast from the master
  after every merge, so rounding to the compute dtype never compounds across rounds;
- evaluation and generation run in the compute dtype; log-probabilities in float32.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.errors import ConfigError
from fedlora.lora import BaseDelta, LoRAFactors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: AVX512-BF16 or AMX on x86, the BF16
    extension on ARM (as oneDNN reports it). Without it bfloat16 is emulated and slower."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64"):
            cpu = torch.cpu
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_native_fp16() -> bool:
    """Whether this CPU multiplies float16 in hardware (AMX-FP16). Elsewhere torch converts every
    float16 product, about a hundred times slower than float32 (1 GFLOP/s here)."""
    try:
        return bool(torch.cpu._is_amx_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype ``model.dtype`` names on ``device``.

    ``auto``: bfloat16 on a CUDA device that supports it and on a CPU with native bfloat16
    (:func:`cpu_has_native_bf16`), float32 elsewhere. ``float16`` on a CPU without native float16
    is refused: it would run far slower than float32.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown model.dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu" and not cpu_has_native_fp16():
        raise ConfigError(
            "model.dtype = float16 on this CPU: it has no native float16 arithmetic, so every "
            "product is converted (about 100x slower than float32); use auto, bfloat16 or float32"
        )
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dense_delta(delta: BaseDelta, device: torch.device) -> torch.Tensor:
    """A base delta as a float32 ``(d_out, d_in)`` matrix on ``device`` (``B A`` for factors)."""
    if isinstance(delta, LoRAFactors):
        return delta.B.to(device, torch.float32) @ delta.A.to(device, torch.float32)
    return delta.to(device, torch.float32)


class MergedBase:
    """The base weights a strategy merges into, kept exactly in float32.

    For each merged module the master is ``W₀ + Σ_t ΔW_t`` in float32, summed in merge order;
    ``W₀`` is the weight as loaded in the compute dtype. After each merge the module's weight
    (the compute copy) is the master cast to the compute dtype. A float32 weight is its own master,
    so a float32 run holds no copy. Two parties that start from the same ``W₀`` and merge the
    same deltas in the same order hold bitwise the same masters and weights.

    ``model`` is the plain base model; modules are found by name at each call, so the model may be
    wrapped in an adapter and unwrapped between calls.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.masters: dict[str, torch.Tensor] = {}
        self.pristine: dict[str, torch.Tensor] = {}
        """``W₀`` of each module :meth:`reset` has seen (kept only by parties that reset)."""

    def _weight(self, name: str) -> torch.Tensor:
        modules = dict(self.model.named_modules())
        if name not in modules:
            raise ConfigError(f"base delta for unknown module {name!r}")
        weight: torch.Tensor = modules[name].weight
        return weight

    def master(self, name: str) -> torch.Tensor:
        """Module ``name``'s float32 master (the weight itself in float32; created on first use)."""
        weight = self._weight(name)
        if weight.dtype == torch.float32:
            return weight
        if name not in self.masters:
            self.masters[name] = weight.detach().float()
        return self.masters[name]

    def merge(self, deltas: Mapping[str, BaseDelta]) -> None:
        """``master ← master + ΔW`` for each named module, then the weight is re-cast from it."""
        with torch.no_grad():
            for name, delta in deltas.items():
                master = self.master(name)
                master.add_(dense_delta(delta, master.device))
                weight = self._weight(name)
                if weight is not master:
                    weight.copy_(master)

    def reset(self, names: Sequence[str]) -> None:
        """Modules ``names`` back to ``W₀`` (their weight when first reset), masters dropped."""
        with torch.no_grad():
            for name in names:
                weight = self._weight(name)
                if name not in self.pristine:
                    self.pristine[name] = weight.detach().clone()
                weight.copy_(self.pristine[name])
                self.masters.pop(name, None)

    def float32_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict in float32 with every merged weight taken from its master:
        the exact merged model (tied weights stay one tensor)."""
        by_storage: dict[int, torch.Tensor] = {}
        state = {}
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                value = by_storage.setdefault(value.data_ptr(), value.float())
            state[key] = value
        for name, master in self.masters.items():
            state[f"{name}.weight"] = master
        return state

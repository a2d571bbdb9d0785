"""The run's numeric precision: which dtype computes, and what is kept in float32 whatever it is.

A run computes in one *compute dtype* (``model.dtype``; ``auto`` picks bfloat16 where the
hardware multiplies it natively, float32 elsewhere). The rules (``docs/precision.md``):

- the frozen base weights are held and multiplied in the compute dtype;
- LoRA parameters, their gradients and AdamW's state are float32 (PEFT casts adapters of a
  bfloat16 / float16 model to float32), and so is every factor a client uploads;
- all aggregation math is float32 or float64 (:mod:`fedlora.strategies`);
- what a strategy merges into the base (FLoRA) is never rounded to the compute dtype: in a
  float32 run it is added into the weights, in a lower dtype it accumulates as a float32 term in
  the forward pass, ``y = W₀ x + (Σ_t ΔW_t) x`` (:class:`MergedBase`);
- evaluation and generation run in the compute dtype; log-probabilities in float32.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.devices import HOST, cuda_bf16_native, is_cpu, is_cuda
from fedlora.errors import ConfigError
from fedlora.linalg import compact, stack
from fedlora.lora import BaseDelta, LoRAFactors, dense_delta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE_VARIABLE = "FEDLORA_AUTO_DTYPE"
"""An environment variable naming what ``model.dtype = "auto"`` resolves to, whatever the
hardware: ``float32`` (a machine without native bfloat16) or ``bfloat16`` (one with it)."""


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

    ``auto``: bfloat16 on a CUDA device that multiplies it natively (compute capability 8.0+,
    :func:`fedlora.devices.cuda_bf16_native`; not V100 or T4, where it is emulated) and on a CPU
    with native bfloat16 (:func:`cpu_has_native_bf16`), float32 elsewhere; the environment
    variable :data:`AUTO_DTYPE_VARIABLE` (``float32`` or ``bfloat16``) overrides that choice, so a
    machine can take another's (the test suite runs both ways on one machine). ``float16`` on a
    CPU without native float16 is refused: it would run far slower than float32.
    """
    if dtype == "auto" and os.environ.get(AUTO_DTYPE_VARIABLE):
        forced = os.environ[AUTO_DTYPE_VARIABLE]
        if forced not in ("float32", "bfloat16"):
            raise ConfigError(
                f"{AUTO_DTYPE_VARIABLE}={forced!r}: use float32 or bfloat16 (or leave it unset)"
            )
        return DTYPES[forced]
    if dtype == "auto":
        if is_cuda(device):
            return torch.bfloat16 if cuda_bf16_native(device) else torch.float32
        if is_cpu(device) and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown model.dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    if dtype == "float16" and is_cpu(device) and not cpu_has_native_fp16():
        raise ConfigError(
            "model.dtype = float16 on this CPU: it has no native float16 arithmetic, so every "
            "product is converted (about 100x slower than float32); use auto, bfloat16 or float32"
        )
    return DTYPES[dtype]


ATTENTION = ("auto", "sdpa", "eager")

EAGER_MAX_LENGTH = 512
"""``auto`` attention takes eager attention on a CPU in bfloat16/float16 up to this length."""


def resolve_attention(
    attention: str, device: torch.device, dtype: torch.dtype, max_length: int
) -> str:
    """The attention implementation ``model.attention`` names (transformers' ``sdpa`` or
    ``eager``).

    ``auto``: eager on a CPU in bfloat16 or float16 for sequences up to
    :data:`EAGER_MAX_LENGTH` tokens, ``sdpa`` elsewhere. Measured with torch 2.13 on 2 AVX512-BF16
    cores, forward and backward of SmolLM2-135M's attention (9 heads, 3 key-value heads, head
    size 64): in bfloat16 the CPU's fused kernel took 4.6 ms against eager's 1.5 ms at 4 × 64
    tokens, 12.3 against 6.0 at 4 × 128, about the same at 256, 20.5 against 17.1 at 512, and
    beat eager only at 1,024 (49 against 84 ms, where eager also holds a ``T × T`` matrix per
    head); in float32 the fused kernel was faster at every length.
    """
    if attention not in ATTENTION:
        raise ConfigError(
            f"unknown model.attention {attention!r}; use one of {', '.join(ATTENTION)}"
        )
    if attention != "auto":
        return attention
    low = dtype in (torch.bfloat16, torch.float16)
    return "eager" if is_cpu(device) and low and max_length <= EAGER_MAX_LENGTH else "sdpa"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class MergedBase:
    """The base weights a strategy merges into, with every merged update kept exactly.

    In float32 a merge is ``W ← W + ΔW`` in place: the weight is its own float32 master. In a
    lower compute dtype the weight ``W₀`` stays as loaded and the accumulated update
    ``Σ_t ΔW_t`` is a float32 term added to the module's output by a forward hook,
    ``y = W₀ x + (Σ_t ΔW_t) x``: factored (the updates stacked, ``B_acc (A_acc x)``) while
    ``R (d_in + d_out) < d_in d_out`` for the stacked rank ``R``, dense beyond. Rounding a sum
    ``W₀ + ΔW`` to bfloat16 would lose most of a round's update (an element of ``ΔW`` below half
    a bfloat16 step of its weight is lost outright), so no merged update is ever rounded to the
    compute dtype. Two parties that start from the same ``W₀`` and merge the same deltas in the
    same order hold bitwise the same state.

    ``model`` is the plain base model; modules are found by name at each merge (the model may be
    wrapped in a PEFT adapter between merges: PEFT keeps the hooked linear layer as its base
    layer, so the term stays in the forward pass).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.terms: dict[str, BaseDelta] = {}
        """The float32 accumulated update of each module whose weight is not float32."""
        self._hooks: dict[str, Any] = {}
        self.pristine: dict[str, torch.Tensor] = {}
        """``W₀`` of each float32 module :meth:`reset` has seen (kept by parties that reset)."""

    def _module(self, name: str) -> Any:
        modules = dict(self.model.named_modules())
        if name not in modules:
            raise ConfigError(f"base delta for unknown module {name!r}")
        return modules[name]

    def merge(self, deltas: Mapping[str, BaseDelta]) -> None:
        """Add ``ΔW`` to each named module: into a float32 weight in place, else into its float32
        term (stacked while factored is smaller, dense beyond)."""
        with torch.no_grad():
            for name, delta in deltas.items():
                module = self._module(name)
                weight = module.weight
                if weight.dtype == torch.float32:
                    weight.add_(_stored(module, dense_delta(delta, weight.device).float()))
                    continue
                self.terms[name] = _accumulate(self.terms.get(name), delta, weight.device)
                if name not in self._hooks:
                    self._hooks[name] = module.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def add_term(module: Any, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> Any:
            x = inputs[0].float()  # (..., d_in): the term runs in float32
            term = self.terms[name]
            # (..., d_out); factored: through (..., R)
            extra = (x @ term.A.T) @ term.B.T if isinstance(term, LoRAFactors) else x @ term.T
            return (out.float() + extra).to(out.dtype)

        return add_term

    def delta(self, name: str) -> torch.Tensor | None:
        """The accumulated update ``Σ_t ΔW_t`` of a module held as a term, float32 dense, on the
        module's device."""
        term = self.terms.get(name)
        return None if term is None else dense_delta(term, self._module(name).weight.device)

    def master(self, name: str) -> torch.Tensor:
        """Module ``name``'s merged weight in float32: ``W₀ + Σ_t ΔW_t`` (the weight itself in
        float32)."""
        weight: torch.Tensor = self._module(name).weight
        if weight.dtype == torch.float32:
            return weight
        term = self.delta(name)
        upcast = weight.detach().float()
        return upcast if term is None else upcast + _stored(self._module(name), term)

    def reset(self, names: Sequence[str]) -> None:
        """Modules ``names`` back to ``W₀``: terms dropped; a float32 weight restored to its value
        when first reset."""
        with torch.no_grad():
            for name in names:
                self.terms.pop(name, None)
                hook = self._hooks.pop(name, None)
                if hook is not None:
                    hook.remove()
                weight = self._module(name).weight
                if weight.dtype != torch.float32:
                    continue
                if name not in self.pristine:
                    self.pristine[name] = weight.detach().clone()
                weight.copy_(self.pristine[name])

    def float32_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict in float32 on the host with every merged update in its weight:
        the exact merged model (tied weights stay one tensor), for writing to a file. Built
        tensor by tensor on the host, so the device never holds a float32 copy of the model."""
        by_storage: dict[int, torch.Tensor] = {}
        state = {}
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                value = by_storage.setdefault(value.data_ptr(), value.to(HOST, torch.float32))
            state[key] = value
        for name in self.terms:
            state[f"{name}.weight"] = self.master(name).to(HOST)
        return state


def _stored(module: Any, delta: torch.Tensor) -> torch.Tensor:
    """``ΔW: (d_out, d_in)`` in the layout ``module`` stores its weight: transposed for
    transformers' ``Conv1D`` (GPT-2), which keeps ``(d_in, d_out)``."""
    from transformers.pytorch_utils import Conv1D

    return delta.T if isinstance(module, Conv1D) else delta


def _accumulate(term: BaseDelta | None, delta: BaseDelta, device: torch.device) -> BaseDelta:
    """``term + delta`` in float32 on ``device``: factors stacked (``[A; A']``, ``[B, B']``) while
    that holds fewer numbers than the dense matrix (:func:`fedlora.linalg.compact`), else dense."""
    if isinstance(delta, LoRAFactors):
        delta = LoRAFactors(
            A=delta.A.to(device, torch.float32), B=delta.B.to(device, torch.float32)
        )
    else:
        delta = delta.to(device, torch.float32)
    if term is None:
        return delta
    if isinstance(term, LoRAFactors) and isinstance(delta, LoRAFactors):
        return compact(stack([term, delta], [1.0, 1.0]))
    return dense_delta(term, device) + dense_delta(delta, device)

"""Core types: LoRA factors with the scaling folded in, and a client's update.

A LoRA module adds ``ΔW = s · B₀ A₀`` to a frozen weight ``W: (d_out, d_in)``, with
``A₀: (r, d_in)``, ``B₀: (d_out, r)`` and the scaling ``s = α / r``. fedlora folds ``s`` into
``B`` once, at the adapter boundary (:func:`fold_scaling`), so every strategy sees ``ΔW = B A``
and never a scaling of its own (the FLoRA reference code applied α/r twice with different values;
see ``docs/algorithms.md``). Folding into ``B`` rather than ``A`` keeps ``A`` bitwise as trained,
which FFA-LoRA's frozen shared ``A`` relies on.

Rank is data: it is read from the shapes, never passed alongside.
Pure torch; no peft, transformers or flwr here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedlora.errors import UpdateError

ADAPTER = "default"
"""The PEFT adapter name of a client that trains alone (fused training names one per client)."""


@dataclass(frozen=True)
class LoRAFactors:
    """One module's low-rank update ``ΔW = B @ A`` with the scaling already folded into ``B``.

    Shapes: ``A: (r, d_in)``, ``B: (d_out, r)``. Component ``i`` (rank-1 term ``B[:, i] A[i]``)
    is column ``i`` of ``B`` with row ``i`` of ``A``.
    """

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError(
                "LoRA factors must be matrices, got "
                f"A{tuple(self.A.shape)} and B{tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"rank mismatch: A{tuple(self.A.shape)} has {self.A.shape[0]} rows but "
                f"B{tuple(self.B.shape)} has {self.B.shape[1]} columns (expected A: (r, d_in), "
                "B: (d_out, r))"
            )
        if not (self.A.is_floating_point() and self.B.is_floating_point()):
            raise ValueError(
                f"LoRA factors must be floating point, got {self.A.dtype}/{self.B.dtype}"
            )
        if self.A.dtype != self.B.dtype or self.A.device != self.B.device:
            raise ValueError(
                f"A and B must share dtype and device, got {self.A.dtype}@{self.A.device} and "
                f"{self.B.dtype}@{self.B.device}"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(d_out, d_in)`` of the weight this update applies to."""
        return (self.d_out, self.d_in)

    def delta(self) -> torch.Tensor:
        """The dense update ``ΔW = B A: (d_out, d_in)``. For tests and small modules only."""
        return self.B @ self.A

    def to(self, dtype: torch.dtype) -> LoRAFactors:
        return LoRAFactors(A=self.A.to(dtype), B=self.B.to(dtype))


BaseDelta = LoRAFactors | torch.Tensor
"""An update to merge into a frozen base weight: factored ``B @ A`` or dense ``(d_out, d_in)``."""


def dense_delta(delta: BaseDelta, device: torch.device | None = None) -> torch.Tensor:
    """The dense ``(d_out, d_in)`` matrix of a base delta, factored or not; with ``device``,
    computed there (factors are moved, not the product)."""
    if isinstance(delta, LoRAFactors):
        if device is None:
            return delta.delta()
        return delta.B.to(device) @ delta.A.to(device)
    return delta if device is None else delta.to(device)


def fold_scaling(A: torch.Tensor, B: torch.Tensor, scaling: float) -> LoRAFactors:
    """PEFT-style factors ``(A₀, B₀)`` with ``ΔW = scaling · B₀ A₀`` → factors with ``ΔW = B A``."""
    if not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"LoRA scaling must be a positive finite number, got {scaling}")
    return LoRAFactors(A=A, B=B * scaling)


def unfold_scaling(factors: LoRAFactors, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fold_scaling`: ``(A₀, B₀)`` such that ``scaling · B₀ A₀ = B A``."""
    if not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"LoRA scaling must be a positive finite number, got {scaling}")
    return factors.A, factors.B / scaling


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local training.

    ``factors`` maps a module name (e.g. ``model.layers.0.self_attn.q_proj``) to its trained
    factors. ``component_index`` (HAFL) maps a module to the global component index of each
    of its ``r`` components, a long tensor ``(r,)``; absent means ``0 … r-1``, i.e. the client
    holds the first ``r`` components of the global adapter. ``num_examples`` drives the default
    client weight ``p_k = n_k / Σ n``. ``importance`` (HAFL) maps a module to a non-negative
    score ``(r,)`` per component (:mod:`fedlora.importance`).
    """

    client_id: str
    factors: Mapping[str, LoRAFactors]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    component_index: Mapping[str, torch.Tensor] | None = None
    importance: Mapping[str, torch.Tensor] | None = None

    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.factors.items()}

    def indices(self, module: str) -> torch.Tensor:
        """Global component indices ``(r,)`` of this client's components of ``module``."""
        f = self.factors[module]
        if self.component_index is not None and module in self.component_index:
            return self.component_index[module]
        return torch.arange(f.rank, device=f.A.device)


def validate_updates(updates: Sequence[ClientUpdate]) -> None:
    """Check a round's updates before any math; raise :class:`UpdateError` naming the culprit.

    Checks: at least one update; unique client ids; a positive example count; the same module keys
    and module shapes ``(d_out, d_in)`` as the first client; finite values; a common dtype;
    component indices of the right length, non-negative and without repeats.
    """
    if not updates:
        raise UpdateError("no client updates to aggregate (the client list is empty)")
    first = updates[0]
    if not first.factors:
        raise UpdateError("the update holds no LoRA modules", client=first.client_id)
    keys = set(first.factors)
    dtype = next(iter(first.factors.values())).A.dtype
    seen: set[str] = set()
    for update in updates:
        cid = update.client_id
        if cid in seen:
            raise UpdateError("the same client id appears twice in one round", client=cid)
        seen.add(cid)
        _check_examples(update)
        _check_keys(update, keys, f"client {first.client_id!r}")
        for name, f in update.factors.items():
            _check_module(update, name, f, first.factors[name], dtype)
        _check_importance(update)


def _check_examples(update: ClientUpdate) -> None:
    n, cid = update.num_examples, update.client_id
    if isinstance(n, bool) or not isinstance(n, int):
        raise UpdateError(f"num_examples must be an int, got {type(n).__name__}", client=cid)
    if n <= 0:
        raise UpdateError(f"num_examples must be > 0, got {n}", client=cid)


def _check_keys(update: ClientUpdate, keys: set[str], whose: str) -> None:
    """The update's modules are exactly ``keys`` (those of ``whose``)."""
    missing, extra = keys - set(update.factors), set(update.factors) - keys
    if missing or extra:
        raise UpdateError(
            f"module keys differ from {whose}: missing {sorted(missing)}, unexpected "
            f"{sorted(extra)}",
            client=update.client_id,
        )


def _check_importance(update: ClientUpdate) -> None:
    for name, score in (update.importance or {}).items():
        if name not in update.factors:
            raise UpdateError(
                "importance for a module without factors", client=update.client_id, module=name
            )
        rank = update.factors[name].rank
        if score.shape != (rank,) or not score.is_floating_point():
            raise UpdateError(
                f"importance must be a float tensor of shape ({rank},), got {score.dtype} "
                f"{tuple(score.shape)}",
                client=update.client_id,
                module=name,
            )
        if not bool(torch.isfinite(score).all()) or bool((score < 0).any()):
            raise UpdateError(
                "importance must be finite and non-negative", client=update.client_id, module=name
            )


def _check_finite(f: LoRAFactors, cid: str, name: str) -> None:
    for label, t in (("A", f.A), ("B", f.B)):
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateError(f"factor {label} has {bad} NaN/Inf values", client=cid, module=name)


def _check_module(
    update: ClientUpdate, name: str, f: LoRAFactors, ref: LoRAFactors, dtype: torch.dtype
) -> None:
    cid = update.client_id
    if f.rank < 1:
        raise UpdateError(
            "rank 0: a LoRA module needs at least one component", client=cid, module=name
        )
    if f.shape != ref.shape:
        raise UpdateError(
            f"weight shape (d_out, d_in) = {f.shape}, expected {ref.shape} as for other clients",
            client=cid,
            module=name,
        )
    if f.A.dtype != dtype:
        raise UpdateError(f"dtype {f.A.dtype}, expected {dtype} as for other modules", client=cid)
    _check_finite(f, cid, name)
    if update.component_index is None or name not in update.component_index:
        return
    idx = update.component_index[name]
    if idx.dtype != torch.long or idx.dim() != 1 or idx.numel() != f.rank:
        raise UpdateError(
            f"component_index must be a long tensor of shape ({f.rank},), got "
            f"{idx.dtype} {tuple(idx.shape)}",
            client=cid,
            module=name,
        )
    if idx.numel() and (int(idx.min()) < 0 or torch.unique(idx).numel() != idx.numel()):
        raise UpdateError(
            f"component_index must be distinct non-negative integers, got {idx.tolist()}",
            client=cid,
            module=name,
        )


@dataclass(frozen=True)
class Expected:
    """What the server expects of one client's update in a round."""

    shapes: Mapping[str, tuple[int, int]]
    """Every module, with its weight shape ``(d_out, d_in)``."""
    rank: int
    """The rank the client was asked to train; it may send fewer components (pruning), never
    more."""
    dtype: torch.dtype = torch.float32
    max_norm: float | None = None
    """Bound on ``‖B A‖_F`` per module (None: no bound)."""
    max_examples: int | None = None
    """Bound on the example count a client may claim (None: no bound)."""


def held_frozen(factor: torch.Tensor, reference: torch.Tensor, ulps: int = 4) -> bool:
    """``factor`` equals ``reference`` within ``ulps`` units of ``factor``'s dtype's rounding
    (relatively, and absolutely at the reference's scale): a factor a client held frozen, after
    its trip through the client's compute dtype, compared in float64 on ``factor``'s device."""
    tol = ulps * torch.finfo(factor.dtype).eps
    ref = reference.to(factor.device, torch.float64)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return torch.allclose(factor.to(torch.float64), ref, rtol=tol, atol=tol * scale)


def update_norm(f: LoRAFactors) -> float:
    """``‖B A‖_F`` from the factors: ``√Σ (BᵀB) ⊙ (A Aᵀ)``, two ``r × r`` Gram matrices."""
    A, B = f.A.double(), f.B.double()
    return math.sqrt(max(0.0, float(((B.T @ B) * (A @ A.T)).sum())))


def screen_update(update: ClientUpdate, expected: Expected) -> None:
    """Check one client's update against what the server expects; raise :class:`UpdateError`
    naming the client and module. Checks: module keys, shapes, rank at most the declared one,
    dtype, finite values, the norm bound, a positive (and bounded) integer example count."""
    cid = update.client_id
    _check_examples(update)
    n = update.num_examples
    if expected.max_examples is not None and n > expected.max_examples:
        raise UpdateError(
            f"num_examples = {n} is more than the {expected.max_examples} allowed", client=cid
        )
    _check_keys(update, set(expected.shapes), "the model's")
    for name, f in update.factors.items():
        if f.shape != tuple(expected.shapes[name]):
            raise UpdateError(
                f"weight shape (d_out, d_in) = {f.shape}, expected {tuple(expected.shapes[name])}",
                client=cid,
                module=name,
            )
        if not 1 <= f.rank <= expected.rank:
            raise UpdateError(
                f"rank {f.rank}, expected 1 … {expected.rank} (the rank it was asked to train)",
                client=cid,
                module=name,
            )
        if f.A.dtype != expected.dtype:
            raise UpdateError(
                f"dtype {f.A.dtype}, expected {expected.dtype}", client=cid, module=name
            )
        _check_finite(f, cid, name)
        if expected.max_norm is not None:
            norm = update_norm(f)
            if norm > expected.max_norm:
                raise UpdateError(
                    f"‖B A‖_F = {norm:.4g} exceeds the bound validation.max_norm = "
                    f"{expected.max_norm:g}",
                    client=cid,
                    module=name,
                )

"""Pure tensor helpers on LoRA factors: pad, truncate, stack, weighted component means, and the
SVD of ``B @ A`` computed from the factors.

Every function takes and returns tensors; none materialises a dense ``(d_out, d_in)`` matrix
unless it says so. Shapes: ``A: (r, d_in)``, ``B: (d_out, r)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from fedlora.lora import BaseDelta, LoRAFactors


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype aggregation math runs in: the input's, but never below float32."""
    return torch.promote_types(dtype, torch.float32)


def truncate(factors: LoRAFactors, rank: int) -> LoRAFactors:
    """The first ``rank`` components: ``A[:rank]``, ``B[:, :rank]`` (no copy)."""
    if rank < 1:
        raise ValueError(f"cannot truncate to rank {rank}; expected >= 1")
    return LoRAFactors(A=factors.A[:rank], B=factors.B[:, :rank])


def pad(factors: LoRAFactors, rank: int) -> LoRAFactors:
    """Zero-pad to ``rank`` components (rows of ``A``, columns of ``B``); ``ΔW`` is unchanged."""
    extra = rank - factors.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {factors.rank} down to {rank}")
    if extra == 0:
        return factors
    A = torch.cat([factors.A, factors.A.new_zeros(extra, factors.d_in)], dim=0)
    B = torch.cat([factors.B, factors.B.new_zeros(factors.d_out, extra)], dim=1)
    return LoRAFactors(A=A, B=B)


def stack(factors: Sequence[LoRAFactors], weights: Sequence[float]) -> LoRAFactors:
    """FLoRA's stacking: ``A_s = [p_1 A_1; …; p_K A_K]`` (R × d_in), ``B_s = [B_1 … B_K]``
    (d_out × R), ``R = Σ r_k``, so that ``B_s A_s = Σ_k p_k B_k A_k`` exactly.
    """
    dtype = work_dtype(factors[0].A.dtype)
    A = torch.cat([f.A.to(dtype) * p for f, p in zip(factors, weights, strict=True)], dim=0)
    B = torch.cat([f.B.to(dtype) for f in factors], dim=1)
    return LoRAFactors(A=A, B=B)


def trimmed_mean(
    values: Sequence[torch.Tensor], weights: Sequence[float], trim: float
) -> torch.Tensor:
    """The coordinate-wise trimmed mean of ``values`` (one per client, one shape; Yin et al.,
    ICML 2018): at every entry the ``⌊trim · K⌋`` smallest and largest of the ``K`` clients'
    values are dropped and the rest averaged, unweighted (a trimmed mean is over clients; the
    weights cannot say which values are extreme). At ``trim = 0.5`` it is the coordinate-wise
    median (for even ``K`` the mean of the two middle values). Where ``K`` is too small to drop
    anyone (``⌊trim · K⌋ = 0``) it is the weighted mean ``Σ p_k v_k / Σ p_k``, the method's own.
    In the work dtype (:func:`work_dtype`)."""
    k = len(values)
    cut = min(math.floor(trim * k), (k - 1) // 2)
    dtype = work_dtype(values[0].dtype)
    stacked = torch.stack([v.to(dtype) for v in values])
    if cut == 0:
        p = torch.tensor(list(weights), dtype=dtype, device=stacked.device)
        return (stacked * (p / p.sum()).view((k,) + (1,) * (stacked.dim() - 1))).sum(dim=0)
    kept: torch.Tensor = stacked.sort(dim=0).values[cut : k - cut]
    return kept.mean(dim=0)


def compact(delta: LoRAFactors) -> BaseDelta:
    """``delta`` as factors when they hold fewer numbers than the dense matrix
    (``R (d_in + d_out) < d_in d_out``), else dense."""
    if delta.rank * (delta.d_in + delta.d_out) < delta.d_in * delta.d_out:
        return delta
    return delta.delta()


def indexed_mean(
    values: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    weights: Sequence[float],
    size: int,
    dim: int,
    *,
    over: Literal["all", "present"],
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean of slices along ``dim`` placed at global positions ``indices[k]``.

    Client ``k``'s slice ``j`` along ``dim`` lands at position ``indices[k][j]`` of a result of
    length ``size`` there. ``over="all"``: a client without position ``i`` counts as zeros,
    ``c_i = Σ_k p_k c_{k,i}`` (``Σ_k p_k = 1``). ``over="present"``: the mean over only the clients
    that hold ``i``, ``c_i = Σ_{k∋i} p_k c_{k,i} / Σ_{k∋i} p_k``; a position nobody holds keeps its
    value in ``previous`` (zero where ``previous`` is absent or shorter).
    """
    ref = values[0]
    dtype = work_dtype(ref.dtype)
    shape = list(ref.shape)
    shape[dim] = size
    total = torch.zeros(shape, dtype=dtype, device=ref.device)
    w_sum = torch.zeros(size, dtype=dtype, device=ref.device)
    for v, idx, p in zip(values, indices, weights, strict=True):
        idx = idx.to(ref.device)
        total.index_add_(dim, idx, v.to(dtype), alpha=p)
        w_sum.index_add_(0, idx, torch.full((idx.numel(),), p, dtype=dtype, device=ref.device))
    if over == "all":
        return total / float(sum(weights))
    view = [1] * total.dim()
    view[dim] = size
    covered = (w_sum > 0).view(view)
    mean = total / torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum)).view(view)
    if previous is not None and not bool(covered.all()):
        prev = torch.zeros_like(mean)
        keep = min(size, previous.shape[dim])
        prev.narrow(dim, 0, keep).copy_(previous.narrow(dim, 0, keep))
        mean = torch.where(covered, mean, prev)
    return mean


def componentwise_mean(
    factors: Sequence[LoRAFactors],
    indices: Sequence[torch.Tensor],
    weights: Sequence[float],
    rank: int,
    *,
    over: Literal["all", "present"],
    previous: LoRAFactors | None = None,
) -> LoRAFactors:
    """Weighted mean of each rank-1 component across clients (:func:`indexed_mean` on the rows
    of ``A`` and the columns of ``B``): zero-padding and FedIT with ``over="all"``, HAFL with
    ``over="present"``. Returns factors of rank ``rank``.
    """
    A = indexed_mean(
        [f.A for f in factors],
        indices,
        weights,
        rank,
        0,
        over=over,
        previous=None if previous is None else previous.A,
    )
    B = indexed_mean(
        [f.B for f in factors],
        indices,
        weights,
        rank,
        1,
        over=over,
        previous=None if previous is None else previous.B,
    )
    return LoRAFactors(A=A, B=B)


def factored_svd(
    factors: LoRAFactors, compute_dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``ΔW = B A`` from the factors: ``ΔW = U diag(S) Vh``, singular values descending.

    With ``R = rank < min(d_out, d_in)``: ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (reduced QR), so
    ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the ``R × R`` core ``R_b R_aᵀ = U_c S V_cᵀ`` gives
    ``U = Q_b U_c: (d_out, R)``, ``Vh = V_cᵀ Q_aᵀ: (R, d_in)``. Cost ``O((d_in + d_out) R²)``
    instead of a dense SVD's ``O(d_out d_in min(d_out, d_in))``. When ``R >= min(d_out, d_in)``
    the dense route is no dearer and is taken; then ``U, S, Vh`` have ``min(d_out, d_in)``
    components.

    The factored route computes in ``compute_dtype`` (float64 by default: it costs about twice
    float32 on ``d × R`` matrices and makes the truncations exact to ~1e-7 where a float32 SVD,
    dense or not, is off by up to ~1e-4 when singular values lie close) and returns the input's
    work dtype.
    """
    dtype = work_dtype(factors.A.dtype)
    if factors.rank >= min(factors.d_out, factors.d_in):
        U, S, Vh = torch.linalg.svd(factors.B.to(dtype) @ factors.A.to(dtype), full_matrices=False)
        return U, S, Vh
    compute = torch.promote_types(dtype, compute_dtype)
    A, B = factors.A.to(compute), factors.B.to(compute)
    Q_b, R_b = torch.linalg.qr(B)  # (d_out, R), (R, R)
    Q_a, R_a = torch.linalg.qr(A.mT)  # (d_in, R), (R, R)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.mT)  # (R, R) core
    return (Q_b @ U_c).to(dtype), S.to(dtype), (Vh_c @ Q_a.mT).to(dtype)


def svd_factors(factors: LoRAFactors) -> LoRAFactors:
    """Re-express ``B A`` in SVD form ``B' = U diag(S)``, ``A' = Vh``: same ``ΔW``, components
    ordered by singular value, so :func:`truncate` to ``r`` gives the best rank-``r`` approximation
    (Eckart–Young). All of ``S`` goes into ``B``, as FlexLoRA's reference code does.
    """
    U, S, Vh = factored_svd(factors)
    return LoRAFactors(A=Vh.contiguous(), B=(U * S[None, :]).contiguous())

"""HetLoRA's sparsity-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024).

Rule: zero-padding to ``r_max``, but client ``k``'s weight for a module is proportional to the
Frobenius norm of its update there, ``p_k ∝ ‖B_k A_k‖_F`` (computed from the factors), so clients
whose update carries more signal count more; clients get their first ``r_k`` components back
(truncation). If every client's update of a module is zero, the configured weighting is used.

Rank self-pruning on the client (decisions where the paper leaves room are in docs/algorithms.md):
local training adds ``λ Σ_modules ‖B_tail‖_F ‖A_tail‖_F`` to the loss, where the tail is the
components ``⌊γ r_k⌋ … r_k − 1``; after training, if the tail's norm is smaller than it was at the
start of the round, the client drops the tail and keeps rank ``max(1, ⌊γ r_k⌋)`` from then on.
The decision is the pure function :func:`self_prune`; the runner applies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedlora.linalg import truncate
from fedlora.lora import ClientUpdate, LoRAFactors, update_norm
from fedlora.strategies.base import RoundInput, Strategy, Traits, register
from fedlora.strategies.zeropad import zero_padded_mean


def norm_weights(
    updates: Sequence[ClientUpdate], module: str, fallback: Sequence[float]
) -> list[float]:
    """``p_k = ‖ΔW_k‖_F / Σ_j ‖ΔW_j‖_F`` for ``module``; ``fallback`` when all norms are zero."""
    norms = [update_norm(u.factors[module]) for u in updates]
    total = sum(norms)
    if total == 0.0:
        return list(fallback)
    return [n / total for n in norms]


@register
class HetLoRA(Strategy):
    name = "hetlora"
    traits = Traits(paper="Cho et al. 2024 (HetLoRA)", mixed_ranks=True)

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        weights = norm_weights(rnd.updates, module, rnd.weights)
        return zero_padded_mean(rnd.updates, weights, module)


def pruned_rank(rank: int, gamma: float) -> int:
    """The rank a client keeps when it prunes: ``max(1, ⌊γ r⌋)``."""
    return max(1, math.floor(gamma * rank))


def tail_norm(factors: Mapping[str, LoRAFactors], gamma: float) -> float:
    """``Σ_modules ‖B_tail‖_F ‖A_tail‖_F`` over the components HetLoRA would prune."""
    total = 0.0
    for f in factors.values():
        keep = pruned_rank(f.rank, gamma)
        total += float(torch.linalg.norm(f.B[:, keep:])) * float(torch.linalg.norm(f.A[keep:]))
    return total


def self_prune(
    start: Mapping[str, LoRAFactors] | None, trained: Mapping[str, LoRAFactors], gamma: float
) -> dict[str, LoRAFactors] | None:
    """The pruned factors if the tail's norm shrank during local training (measured against
    ``start``, what the client started the round from; a fresh start has norm zero and never
    prunes), else None."""
    if start is None or tail_norm(trained, gamma) >= tail_norm(start, gamma):
        return None
    if all(pruned_rank(f.rank, gamma) == f.rank for f in trained.values()):
        return None
    return {name: truncate(f, pruned_rank(f.rank, gamma)) for name, f in trained.items()}

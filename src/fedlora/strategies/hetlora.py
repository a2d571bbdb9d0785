"""HetLoRA's sparsity-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024).

Rule: zero-padding to ``r_max``, but client ``k``'s weight for a module is proportional to the
Frobenius norm of its update there, ``p_k ∝ ‖B_k A_k‖_F`` (computed from the factors), so clients
whose update carries more signal count more; clients get their first ``r_k`` components back
(truncation). If every client's update of a module is zero, the configured weighting is used.
Self-pruning of ranks on the client is local training, not aggregation, and lives with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.linalg import frobenius_norm_of_product
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.strategies.base import RoundInput, Strategy, Traits, register
from fedlora.strategies.zeropad import zero_padded_mean


def norm_weights(
    updates: Sequence[ClientUpdate], module: str, fallback: Sequence[float]
) -> list[float]:
    """``p_k = ‖ΔW_k‖_F / Σ_j ‖ΔW_j‖_F`` for ``module``; ``fallback`` when all norms are zero."""
    norms = [frobenius_norm_of_product(u.factors[module]) for u in updates]
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

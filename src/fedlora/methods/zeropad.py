"""Zero-padding: the heterogeneous-rank baseline of FLoRA (Wang et al., NeurIPS 2024) and
HetLoRA (Cho et al., EMNLP 2024).

Rule: pad every client's ``A_k`` (rows) and ``B_k`` (columns) with zeros to ``r_max``, take the
weighted mean of each, and give client ``k`` the first ``r_k`` components back. A client
without component ``i`` counts as zeros there, which dilutes the high components (HAFL's point).
Scaling is folded into the factors once, at the adapter boundary; the FLoRA reference code's
zero-padding applied the server's α/r on top of the clients' (16× too strong).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.linalg import componentwise_mean, pad, trimmed_mean
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.strategies.base import RoundInput, Strategy, Traits, register


def zero_padded_mean(
    updates: Sequence[ClientUpdate], weights: Sequence[float], module: str, trim: float = 0.0
) -> LoRAFactors:
    """``Σ_k p_k pad(A_k)`` and ``Σ_k p_k pad(B_k)`` at ``r_max`` for one module; client ``k``'s
    components are the first ``r_k``. At equal ranks this is FedIT's ``(Ā, B̄)``. With ``trim``
    (``validation.trim``), the coordinate-wise trimmed mean of the padded factors instead
    (:func:`fedlora.linalg.trimmed_mean`; a padded zero is a value like any other, as in the
    mean)."""
    factors = [u.factors[module] for u in updates]
    rank = max(f.rank for f in factors)
    if trim:
        padded = [pad(f, rank) for f in factors]
        return LoRAFactors(
            A=trimmed_mean([f.A for f in padded], weights, trim),
            B=trimmed_mean([f.B for f in padded], weights, trim),
        )
    indices = [torch.arange(f.rank, device=f.A.device) for f in factors]
    return componentwise_mean(factors, indices, weights, rank, over="all")


@register
class ZeroPad(Strategy):
    name = "zeropad"
    traits = Traits(
        paper="Wang et al. 2024 (FLoRA), zero-padding baseline", mixed_ranks=True, averages=True
    )

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        return zero_padded_mean(rnd.updates, rnd.weights, module, rnd.trim)

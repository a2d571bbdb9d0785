"""FlexLoRA: full-size aggregation and SVD redistribution (Bai et al., "Federated Fine-tuning of
Large Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024).

Rule: ``ΔW_g = Σ_k p_k B_k A_k``; client ``k`` starts the next round from the best rank-``r_k``
approximation of ``ΔW_g`` (SVD truncation): ``B_k = U_r S_r``, ``A_k = V_rᵀ`` (all of ``S`` into
``B``, as the reference code does; the adapter boundary divides by the client's own scaling).

``ΔW_g`` has rank ``≤ R = Σ r_k``, so its SVD is computed from the stacked factors (QR of
``B_s`` and ``A_sᵀ``, SVD of the ``R × R`` core; :func:`fedlora.linalg.factored_svd`) instead of
the reference code's dense SVD of every ``d_out × d_in`` matrix. The global state holds the SVD
form, ordered by singular value, so each client's truncation is a slice, computed once per
distinct rank.

With ``validation.trim`` the server takes the coordinate-wise trimmed mean of the clients' dense
``ΔW_k`` instead (:func:`fedlora.linalg.trimmed_mean`; a robust rule, not the paper's), and
keeps its SVD at the rank ``Σ r_k`` the exact sum has: ``K`` dense matrices per module, once a
round.
"""

from __future__ import annotations

import torch

from fedlora.linalg import stack, svd_factors, trimmed_mean
from fedlora.lora import LoRAFactors
from fedlora.strategies.base import RoundInput, Strategy, Traits, register


@register
class FlexLoRA(Strategy):
    name = "flexlora"
    traits = Traits(
        paper="Bai et al. 2024 (FlexLoRA)", mixed_ranks=True, averages=True, exact="always"
    )

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        factors = rnd.factors(module)
        if not rnd.trim:
            return svd_factors(stack(factors, rnd.weights))
        # the trimmed mean of the dense ΔW_k, in SVD form at the rank the exact sum would have
        dense = trimmed_mean([f.delta() for f in factors], rnd.weights, rnd.trim)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        rank = min(sum(f.rank for f in factors), S.numel())
        return LoRAFactors(A=Vh[:rank].contiguous(), B=(U[:, :rank] * S[:rank]).contiguous())

"""FedEx-LoRA: exact aggregation for federated LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA:
Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models", ACL 2025).

Rule: FedIT's averages ``Ā = Σ p_k A_k`` and ``B̄ = Σ p_k B_k`` are the global adapter every
client warm-starts from, and the residual ``Σ_k p_k B_k A_k − B̄ Ā`` that FedIT drops is merged
into the base weights, so that ``W₀ + Σ_t residual_t + B̄ Ā = W₀ + Σ_t Σ_k p_k ΔW_k`` after every
round: exact, like FLoRA, but clients keep training the global adapter. Equal ranks.

The residual is built from factors: ``[B_1 … B_K, B̄] [p_1 A_1; …; p_K A_K; −Ā]`` (rank
``(K + 1) r``), kept factored where that is smaller than dense (:func:`fedlora.linalg.compact`),
merged exactly in float32 like FLoRA's update. Deviation from the paper: its code merges the
residual into the weights it holds as a dense matrix each round; here it is one more merged
update that clients receive and merge themselves (Flower nodes too), counted as traffic.

Weights: the paper and its code average with ``1/K``; here the run's weighting gives ``p_k``
(``examples`` by default: data size), the paper's rule with ``weighting = "uniform"``. The
official code (``RaghavSinghal10/fedex-lora``, ``fed_agg.py``) adds the *transpose* of the
residual to the weights, which is wrong for square layers; the residual merged here is
``Σ_k p_k B_k A_k − B̄ Ā`` itself, so the merged model is the exact sum.
"""

from __future__ import annotations

from fedlora.linalg import compact, stack
from fedlora.lora import LoRAFactors
from fedlora.methods.fedit import FedIT
from fedlora.strategies.base import GlobalState, RoundInput, Traits, register


@register
class FedExLoRA(FedIT):
    name = "fedex"
    traits = Traits(
        paper="Singhal et al. 2025 (FedEx-LoRA)",
        mixed_ranks=False,
        merges_into_base=True,
        exact="always",
    )

    def _aggregate(self, rnd: RoundInput) -> GlobalState:
        factors = {m: self._combine(rnd, m) for m in rnd.modules}
        residual = {}
        for m, mean in factors.items():
            parts = [*rnd.factors(m), LoRAFactors(A=mean.A, B=mean.B)]
            residual[m] = compact(stack(parts, [*rnd.weights, -1.0]))
        return GlobalState(factors=factors, base_delta=residual, round=rnd.state.round + 1)

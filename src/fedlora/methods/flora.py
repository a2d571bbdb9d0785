"""FLoRA: stacking-based, noise-free aggregation of heterogeneous LoRA (Wang et al., "FLoRA:
Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024).

Rule: ``A_s = [p_1 A_1; …; p_K A_K]``, ``B_s = [B_1 … B_K]``, so ``B_s A_s = Σ_k p_k B_k A_k``
exactly, for any ranks, any per-client scaling (folded into ``B_k``) and any subset of clients:
the stacked rank is ``Σ r_k`` of the clients that took part (the reference code hard-wired
``r × num_clients``). The update is merged into the base weights and every client starts the
next round from a fresh adapter at its own rank.

The base delta stays factored when ``R (d_in + d_out) < d_in d_out`` (fewer numbers to hold,
send and merge), dense otherwise.
"""

from __future__ import annotations

from fedlora.linalg import compact, stack
from fedlora.lora import LoRAFactors
from fedlora.strategies.base import GlobalState, RoundInput, Strategy, Traits, register


@register
class FLoRA(Strategy):
    name = "flora"
    traits = Traits(
        paper="Wang et al. 2024 (FLoRA)",
        mixed_ranks=True,
        merges_into_base=True,
        fresh_client_adapters=True,
        exact="always",
    )

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        return stack(rnd.factors(module), rnd.weights)

    def _aggregate(self, rnd: RoundInput) -> GlobalState:
        delta = {m: compact(self._combine(rnd, m)) for m in rnd.modules}
        return GlobalState(base_delta=delta, round=rnd.state.round + 1)

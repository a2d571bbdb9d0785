"""HAFL's adaptive rank-1 aggregation (Yan, Su and Deng, "Federated LLMs Fine-tuned with Adaptive
Importance-Aware LoRA", arXiv:2411.06581, 2024).

Rule: a LoRA of rank ``r_g`` is a sum of rank-1 components ``B[:, i] A[i]``. Client ``k`` updates
only some of them (``ClientUpdate.component_index``; by default its first ``r_k``). Component
``i`` of the new global adapter is the weighted mean over only the clients that updated it,
``c_i = Σ_{k∋i} p_k c_{k,i} / Σ_{k∋i} p_k``, instead of zero-padding's mean over all clients,
which dilutes the components that only high-rank clients train. A component nobody updated
keeps its previous value. When every client updates every component this equals zero-padding.
Which components a client receives and trains (importance-based truncation or freezing) is
decided on top of this rule by the HAFL client modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fedlora.linalg import componentwise_mean, indexed_mean
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.strategies.base import GlobalState, RoundInput, Strategy, Traits, register


def rank_one_mean(
    state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float], module: str
) -> LoRAFactors:
    """The per-component mean over the clients that updated each component of ``module``."""
    indices = [u.indices(module) for u in updates]
    previous = state.factors.get(module)
    rank = max(int(i.max()) + 1 for i in indices)
    if previous is not None:
        rank = max(rank, previous.rank)
    factors = [u.factors[module] for u in updates]
    return componentwise_mean(factors, indices, weights, rank, over="present", previous=previous)


@register
class HAFL(Strategy):
    name = "hafl"
    traits = Traits(paper="Yan et al. 2024 (HAFL)", mixed_ranks=True, component_level=True)

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        return rank_one_mean(rnd.state, rnd.updates, rnd.weights, module)

    def _aggregate(self, rnd: RoundInput) -> GlobalState:
        new = super()._aggregate(rnd)
        importance = {m: aggregate_importance(rnd, m, new.factors[m].rank) for m in rnd.modules}
        return replace(new, importance={m: s for m, s in importance.items() if s is not None})


def aggregate_importance(rnd: RoundInput, module: str, rank: int) -> torch.Tensor | None:
    """The server's importance ``(r_g,)``: per component, the weighted mean of the scores of the
    clients that reported it; components nobody reported keep their previous score."""
    reporting = [
        (u, p)
        for u, p in zip(rnd.updates, rnd.weights, strict=True)
        if u.importance is not None and module in u.importance
    ]
    previous = rnd.state.importance.get(module)
    if not reporting:
        return previous
    return indexed_mean(
        [u.importance[module] for u, _ in reporting],  # type: ignore[index]
        [u.indices(module) for u, _ in reporting],
        [p for _, p in reporting],
        rank,
        0,
        over="present",
        previous=previous,
    )

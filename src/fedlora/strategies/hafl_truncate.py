"""HAFL's importance-based truncation (Yan, Su and Deng, "Federated LLMs Fine-tuned with
Adaptive Importance-Aware LoRA", arXiv:2411.06581, 2024).

Rule: the server keeps a global LoRA of rank ``r_g`` and an importance per component
(:attr:`GlobalState.importance`, aggregated from the clients' smoothed-sensitivity scores).
Client ``k`` receives its ``r_k`` **most important** components (not simply the first ``r_k``),
trains at rank ``r_k``, and its update is mapped back to those component indices; aggregation is
HAFL's rank-1 rule (mean over only the clients that updated each component). A client whose rank
exceeds ``r_g`` gets all ``r_g`` components plus fresh ones, which take the next indices.
Before any importance exists (round 1), the first ``r_k`` components are used.
"""

from __future__ import annotations

import torch

from fedlora.lora import LoRAFactors
from fedlora.strategies.base import GlobalState, RankSpec, Start, Traits, module_rank, register
from fedlora.strategies.hafl import HAFL


def top_components(state: GlobalState, module: str, rank: int) -> torch.Tensor:
    """Global indices (ascending) of the ``min(rank, r_g)`` most important components of
    ``module``, on its factors' device; ties go to the lower index. The first ones when no
    importance is known."""
    f = state.factors[module]
    keep = min(rank, f.rank)
    scores = state.importance.get(module)
    if scores is None or scores.numel() != f.rank:
        return torch.arange(keep, device=f.A.device)
    order = torch.argsort(scores, descending=True, stable=True)[:keep]
    return order.sort().values.to(f.A.device)


@register
class HAFLTruncate(HAFL):
    name = "hafl-truncate"
    traits = Traits(
        paper="Yan et al. 2024 (HAFL, importance-based truncation)",
        mixed_ranks=True,
        component_level=True,
    )

    def component_indices(
        self, state: GlobalState, spec: RankSpec
    ) -> dict[str, torch.Tensor] | None:
        if not state.factors:
            return None
        out = {}
        for name, f in state.factors.items():
            rank = module_rank(spec, name)
            top = top_components(state, name, rank)
            fresh = torch.arange(f.rank, f.rank + max(0, rank - f.rank), device=top.device)
            out[name] = torch.cat([top, fresh])
        return out

    def _start(self, state: GlobalState, spec: RankSpec) -> Start:
        if not state.factors:
            return None
        start = {}
        for name, f in state.factors.items():
            idx = top_components(state, name, module_rank(spec, name))
            start[name] = LoRAFactors(A=f.A[idx], B=f.B[:, idx])
        return start

"""HAFL's importance-based freezing (Yan, Su and Deng, "Federated LLMs Fine-tuned with Adaptive
Importance-Aware LoRA", arXiv:2411.06581, 2024).

Rule: the server and every client hold the same rank-``r_g`` LoRA. Client ``k`` trains only its
``r_k`` **most important** components (by the server's aggregated importance); the other
``r_g − r_k`` stay in its forward pass but frozen: no gradient, no optimizer state, bit-identical
after local training. It uploads only the components it trained, with their global indices, so
its upload scales with ``r_k`` (its download is the whole rank-``r_g`` adapter). Aggregation is
HAFL's rank-1 rule. Unlike truncation, a low-rank client trains against the full global model, so
no component is dropped from what it sees.
"""

from __future__ import annotations

import torch

from fedlora.lora import LoRAFactors
from fedlora.strategies.base import GlobalState, RankSpec, Start, Traits, module_rank, register
from fedlora.strategies.hafl_truncate import HAFLTruncate, top_components


def frozen_indices(state: GlobalState, module: str, rank: int) -> torch.Tensor:
    """Global indices (ascending) of the components of ``module`` a rank-``rank`` client holds
    but does not train: all but its top ``rank``."""
    r_g = state.factors[module].rank
    device = state.factors[module].A.device
    keep = torch.zeros(r_g, dtype=torch.bool, device=device)
    keep[top_components(state, module, rank)] = True
    return torch.arange(r_g, device=device)[~keep]


@register
class HAFLFreeze(HAFLTruncate):
    name = "hafl-freeze"
    traits = Traits(
        paper="Yan et al. 2024 (HAFL, importance-based freezing)",
        mixed_ranks=True,
        component_level=True,
    )

    def frozen_components(self, state: GlobalState, spec: RankSpec) -> Start:
        if not state.factors:
            return None
        frozen = {}
        for name, f in state.factors.items():
            idx = frozen_indices(state, name, module_rank(spec, name))
            if idx.numel():
                frozen[name] = LoRAFactors(A=f.A[idx], B=f.B[:, idx])
        return frozen or None

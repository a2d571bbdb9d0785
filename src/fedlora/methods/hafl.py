"""HAFL (Yan, Su and Deng, "Federated LLMs Fine-tuned with Adaptive Importance-Aware LoRA",
arXiv:2411.06581, 2024): its rank-1 aggregation (``hafl``) and the two client modes built on it,
importance-based truncation (``hafl-truncate``) and freezing (``hafl-freeze``).

Adaptive rank-1 aggregation. A LoRA of rank ``r_g`` is a sum of rank-1 components ``B[:, i] A[i]``.
Client ``k`` updates only some of them (``ClientUpdate.component_index``; by default its first
``r_k``). Component ``i`` of the new global adapter is the weighted mean over only the clients that
updated it, ``c_i = Σ_{k∋i} p_k c_{k,i} / Σ_{k∋i} p_k``, instead of zero-padding's mean over all
clients, which dilutes the components that only high-rank clients train. A component nobody updated
keeps its previous value. When every client updates every component this equals zero-padding. Which
components a client receives and trains (importance-based truncation or freezing) is decided on top
of this rule by the HAFL client modes.

Importance-based truncation (``hafl-truncate``). The server keeps a global LoRA of rank ``r_g`` and
an importance per component (:attr:`GlobalState.importance`, aggregated from the clients' smoothed-
sensitivity scores). Client ``k`` receives its ``r_k`` **most important** components (not simply
the first ``r_k``), trains at rank ``r_k``, and its update is mapped back to those component
indices; aggregation is HAFL's rank-1 rule (mean over only the clients that updated each
component). A client whose rank exceeds ``r_g`` gets all ``r_g`` components plus fresh ones, which
take the next indices. Before any importance exists (round 1), the first ``r_k`` components are
used.

Importance-based freezing (``hafl-freeze``). The server and every client hold the same rank-``r_g``
LoRA. Client ``k`` trains only its ``r_k`` **most important** components (by the server's
aggregated importance); the other ``r_g − r_k`` stay in its forward pass but frozen: no gradient,
no optimizer state, bit-identical after local training. It uploads only the components it trained,
with their global indices, so its upload scales with ``r_k`` (its download is the whole
rank-``r_g`` adapter). Aggregation is HAFL's rank-1 rule. Unlike truncation, a low-rank client
trains against the full global model, so no component is dropped from what it sees.

The client side of both modes (:class:`ImportanceClient`): clients track each component's
importance during local training (:mod:`fedlora.importance`) and send it with their factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from fedlora.clients.base import Callbacks, ClientHook, Upload
from fedlora.linalg import componentwise_mean, indexed_mean
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.strategies.base import (
    GlobalState,
    RankSpec,
    RoundInput,
    Start,
    Strategy,
    Traits,
    module_rank,
    register,
)


class ImportanceClient(ClientHook):
    also_sends = "importance scores"
    fuses = False  # importance is tracked per step, on the one adapter

    def prepare(self, peft_model: Any) -> Callbacks:
        from fedlora import adapters

        super().prepare(peft_model)
        self.tracker = adapters.importance_tracker(peft_model)
        return Callbacks(on_step=self.tracker.step)

    def read(self, peft_model: Any) -> Upload:
        upload = super().read(peft_model)
        return Upload(upload.factors, upload.kept, importance=self.tracker.scores())


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
    client = ImportanceClient
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
        downloads_global_rank=True,
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

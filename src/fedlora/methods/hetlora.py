"""HetLoRA's sparsity-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024).

Rule: zero-padding to ``r_max``, but client ``k``'s weight for a module is proportional to the
Frobenius norm of its update there, ``p_k ∝ ‖B_k A_k‖_F`` (computed from the factors), so clients
whose update carries more signal count more; clients get their first ``r_k`` components back
(truncation). If every client's update of a module is zero, the configured weighting is used.

The client side (:class:`HetLoRAClient`), rank self-pruning (decisions where the paper leaves
room are in docs/algorithms.md): local training adds ``λ Σ_modules ‖B_tail‖_F ‖A_tail‖_F`` to the
loss, the tail being the components ``⌊γ r_k⌋ … r_k − 1``; after training (and after privacy's
noise, on what is sent), if the tail's norm is smaller than at the start of the round, the client
drops the tail and trains rank ``max(1, ⌊γ r_k⌋)`` from then on. The decision is the pure
function :func:`self_prune`; the hook applies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.clients.base import Callbacks, ClientHook, Upload
from fedlora.errors import ConfigError
from fedlora.linalg import truncate
from fedlora.lora import ClientUpdate, LoRAFactors, update_norm
from fedlora.methods.zeropad import zero_padded_mean
from fedlora.schema import method_options, options_of
from fedlora.strategies.base import RoundInput, Strategy, Traits, register


@method_options("hetlora")
@dataclass
class HetLoRAOptions:
    """HetLoRA's rank self-pruning on the client (strategy ``hetlora``)."""

    prune: bool = True
    gamma: float = 0.9
    """A client that prunes keeps rank ``max(1, ⌊γ r⌋)``; the tail is the components beyond."""
    reg: float = 0.01
    """λ of the regulariser ``λ Σ ‖B_tail‖_F ‖A_tail‖_F`` added to the local loss."""

    def check(self) -> None:
        if not 0 < self.gamma < 1:
            raise ConfigError(f"hetlora.gamma must be in (0, 1), got {self.gamma}")
        if self.reg < 0:
            raise ConfigError(f"hetlora.reg must be >= 0, got {self.reg}")


class HetLoRAClient(ClientHook):
    shrinks_rank = True
    fuses = False  # its tail penalty is added to one client's loss at every step

    def prepare(self, peft_model: Any) -> Callbacks:
        from fedlora import adapters

        super().prepare(peft_model)
        o = options_of(self.session.cfg, HetLoRAOptions)
        if not o.prune or o.reg == 0:
            return Callbacks()
        keep = {n: pruned_rank(self.session.plan.rank, o.gamma) for n in self.session.modules}
        tail = adapters.tail_penalty(peft_model, keep)
        reg = o.reg
        return Callbacks(penalty=lambda: reg * tail())

    def finish(self, upload: Upload) -> Upload:
        o = options_of(self.session.cfg, HetLoRAOptions)
        if not o.prune:
            return upload
        pruned = self_prune(self.session.plan.start, upload.factors, o.gamma)
        if pruned is None:
            return upload
        kept = {n: f.rank for n, f in pruned.items()}
        return Upload(pruned, kept, upload.importance, next_rank=min(kept.values()))


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
    client = HetLoRAClient
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

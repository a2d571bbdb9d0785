"""HetLoRA's client: rank self-pruning (Cho et al., EMNLP 2024; the server side is
:mod:`fedlora.strategies.hetlora`).

Local training adds ``λ Σ_modules ‖B_tail‖_F ‖A_tail‖_F`` to the loss, the tail being the
components ``⌊γ r_k⌋ … r_k − 1``; after training (and after privacy's noise, on what is sent), if
the tail's norm is smaller than at the start of the round, the client drops the tail and trains
rank ``max(1, ⌊γ r_k⌋)`` from then on (:func:`fedlora.strategies.hetlora.self_prune`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.clients.base import Callbacks, ClientHook, Upload, register_hook
from fedlora.config import method_options, options_of
from fedlora.errors import ConfigError
from fedlora.strategies.hetlora import pruned_rank, self_prune


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


@register_hook("hetlora")
class HetLoRAClient(ClientHook):
    shrinks_rank = True

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

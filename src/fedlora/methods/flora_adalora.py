"""FLoRA with AdaLoRA clients (``flora-adalora``, FLoRA's appendix): the server stacks exactly as
:mod:`fedlora.methods.flora` does; each client trains PEFT's AdaLoRA from its rank ``r_k``, which
prunes components during local training by importance, and sends the components it kept
(singular values folded into ``A``), whatever their number per module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.clients.base import Callbacks, ClientHook
from fedlora.errors import ConfigError
from fedlora.methods.flora import FLoRA
from fedlora.schema import method_options, options_of
from fedlora.strategies.base import Traits, register


@method_options("adalora")
@dataclass
class AdaLoRAOptions:
    """AdaLoRA clients (strategy ``flora-adalora``), through PEFT's ``AdaLoraConfig``."""

    target_ratio: float = 0.5
    """Each client's budget shrinks to ``max(1, round(ratio · r_k))`` per module on average."""
    tinit: float = 0.1
    """Fraction of the local steps before pruning starts."""
    tfinal: float = 0.2
    """Fraction of the local steps after the final budget is fixed (at least one step)."""
    delta_t: int = 1
    """Steps between budget allocations."""
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.5
    """Weight of AdaLoRA's orthogonality regulariser."""

    def check(self) -> None:
        if not 0 < self.target_ratio <= 1:
            raise ConfigError(f"adalora.target_ratio must be in (0, 1], got {self.target_ratio}")
        if not (0 <= self.tinit < 1 and 0 <= self.tfinal < 1 and self.tinit + self.tfinal < 1):
            raise ConfigError(
                "adalora.tinit and adalora.tfinal must be fractions in [0, 1) with a sum below "
                f"1, got {self.tinit} and {self.tfinal}"
            )
        if self.delta_t < 1:
            raise ConfigError(f"adalora.delta_t must be >= 1, got {self.delta_t}")


class AdaLoRAClient(ClientHook):
    shrinks_rank = True
    also_sends = "AdaLoRA's kept ranks"
    fuses = False  # PEFT's AdaLoRA has no mixed-adapter forward; its budget is per step

    def attach(self, model: Any) -> Any:
        from fedlora import adapters

        s, o = self.session, options_of(self.session.cfg, AdaLoRAOptions)
        target = max(1, round(o.target_ratio * s.plan.rank))
        return adapters.attach_adalora(
            model, s.cfg.model.targets, s.plan.rank, s.alpha, s.seed, s.steps, target, o
        )

    def prepare(self, peft_model: Any) -> Callbacks:
        return Callbacks(after_step=peft_model.base_model.update_and_allocate)


@register
class FLoRAAdaLoRA(FLoRA):
    """FLoRA with AdaLoRA clients (FLoRA's appendix): each client trains PEFT's AdaLoRA from its
    rank ``r_k``, which prunes components during local training by importance; the client sends
    the components it kept (singular values folded into ``A``), whatever their number per module,
    and stacking is exact for them as for any ranks."""

    name = "flora-adalora"
    client = AdaLoRAClient
    traits = Traits(
        paper="Wang et al. 2024 (FLoRA, AdaLoRA clients)",
        mixed_ranks=True,
        merges_into_base=True,
        fresh_client_adapters=True,
        exact="always",
    )

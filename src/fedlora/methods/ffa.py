"""FFA-LoRA: federated freeze-A LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024).

Rule: every client's ``A`` is frozen at one shared, seeded initialisation ``A_0`` (rank
``r_max``; a client of rank ``r_k`` holds its first ``r_k`` rows) and only ``B`` trains. Then
``Σ_k p_k B_k A_0[:r_k] = B̄ A_0`` with ``B̄ = Σ_k p_k pad(B_k)``: averaging ``B`` is exact, for
mixed ranks too. Clients start from ``(A_0[:r_k], B̄[:, :r_k])``. An update whose ``A`` moved away
from ``A_0`` is rejected, since averaging its ``B`` would no longer be exact.

The client side (:class:`FreezeAClient`): ``A`` stays at the shared ``A_0``, only ``B`` trains and
travels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlora.clients.base import ClientHook, Scalar
from fedlora.errors import UpdateError
from fedlora.lora import LoRAFactors, held_frozen
from fedlora.methods.zeropad import zero_padded_mean
from fedlora.strategies.base import RoundInput, Strategy, Traits, register


class FreezeAClient(ClientHook):
    @classmethod
    def sent(cls, options: Mapping[str, Scalar]) -> tuple[str, ...]:
        del options
        return ("B",)


@register
class FFALoRA(Strategy):
    name = "ffa"
    client = FreezeAClient
    traits = Traits(
        paper="Sun et al. 2024 (FFA-LoRA)",
        mixed_ranks=True,
        fixed_a=True,
        averages=True,
        exact="always",
    )

    def _check(self, rnd: RoundInput) -> None:
        state = rnd.state
        for update in rnd.updates:
            for module, f in update.factors.items():
                if module not in state.factors:
                    raise UpdateError(
                        "no shared A_0 for this module; build the state with init_state()",
                        client=update.client_id,
                        module=module,
                    )
                A0 = state.factors[module].A
                if f.rank > A0.shape[0] or f.shape != state.factors[module].shape:
                    raise UpdateError(
                        f"rank {f.rank} and shape {f.shape} do not fit the shared A_0 of rank "
                        f"{A0.shape[0]} and shape {state.factors[module].shape}",
                        client=update.client_id,
                        module=module,
                    )
                if not held_frozen(f.A, A0[: f.rank]):
                    raise UpdateError(
                        "A differs from the shared A_0; FFA-LoRA needs A frozen (train B only)",
                        client=update.client_id,
                        module=module,
                    )

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        init = rnd.state.factors[module]
        # the mean's A is ignored: A stays A_0
        mean = zero_padded_mean(rnd.updates, rnd.weights, module, rnd.trim)
        B = torch.zeros_like(init.B, dtype=mean.B.dtype)
        B[:, : mean.rank] = mean.B
        return LoRAFactors(A=init.A.to(mean.B.dtype), B=B)

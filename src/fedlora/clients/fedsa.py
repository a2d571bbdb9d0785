"""FedSA-LoRA's clients (Guo et al., ICLR 2025; the server side is :mod:`fedlora.strategies.fedsa`):
``A`` starts from the server's ``Ā``, ``B`` from the client's own ``B_k`` of its last round
(zero before its first), kept in the client's state; only ``A`` comes down."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.clients.base import Callbacks, ClientHook, Scalar, Upload, register_hook
from fedlora.lora import LoRAFactors


@register_hook("fedsa")
class OwnBClient(ClientHook):
    keeps_state = True

    @classmethod
    def received(cls, options: Mapping[str, Scalar]) -> tuple[str, ...]:
        del options
        return ("A",)

    def prepare(self, peft_model: Any) -> Callbacks:
        from fedlora import adapters

        s = self.session
        if s.state is None:
            raise RuntimeError("fedsa's client needs its state across rounds; the runner gave none")
        own = s.state.load()
        start = adapters.read_factors(peft_model)  # Ā as the plan's start loaded it
        adapters.write_factors(
            peft_model,
            {
                m: LoRAFactors(A=f.A, B=own[m].B.to(f.B) if own else f.B.new_zeros(f.B.shape))
                for m, f in start.items()
            },
        )
        return super().prepare(peft_model)

    def read(self, peft_model: Any) -> Upload:
        upload = super().read(peft_model)
        assert self.session.state is not None
        self.session.state.save(upload.factors)  # what it trained, before any privacy noise
        return upload

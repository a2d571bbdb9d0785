"""FedSA-LoRA: selective aggregation (Guo et al., "Selective Aggregation for Low-Rank Adaptation
in Federated Learning", ICLR 2025).

Rule: only ``A`` is shared: ``Ā = Σ p_k A_k`` is what every client starts the next round's ``A``
from, while each client keeps its own ``B_k`` across rounds (``A`` learns what clients share, ``B``
what is their own, the paper's analysis). The client side (:class:`OwnBClient`) keeps ``B_k`` in
the client's state (a file per client in-process, ``context.state`` on a Flower node) and replaces
the start's ``B`` with it; a client's first round starts from ``B = 0``. Only ``Ā`` travels down.
In rounds due for evaluation each client's own model is scored on the held-out set as the official
code (FederatedScope) does, after the server's broadcast, on ``(Ā, B_k)`` with the new ``Ā``
(``personal_*`` metrics), and also right after its training, on ``(A_k, B_k)``
(``personal_local_*``); the global model is ``(Ā, B̄)`` with the mean ``B̄ = Σ p_k B_k`` (FedIT's
average, here the mean of what the clients keep).

Deviation: the paper's clients upload only ``A``; here they also upload ``B_k`` so the server can
form and export the global model with the mean ``B̄`` (counted as traffic: FedSA's upload equals
FedIT's, its download is ``A`` alone); ``B̄`` is never sent back. Equal ranks, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.clients.base import Callbacks, ClientHook, Scalar, Upload
from fedlora.lora import LoRAFactors
from fedlora.methods.fedit import FedIT
from fedlora.strategies.base import Traits, register


class OwnBClient(ClientHook):
    keeps_state = True
    fuses = False  # its own B and its scoring act on the one adapter

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


@register
class FedSALoRA(FedIT):
    name = "fedsa"
    client = OwnBClient
    traits = Traits(paper="Guo et al. 2025 (FedSA-LoRA)", mixed_ranks=False, averages=True)

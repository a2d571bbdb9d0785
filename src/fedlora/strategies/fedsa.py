"""FedSA-LoRA: selective aggregation (Guo et al., "Selective Aggregation for Low-Rank Adaptation
in Federated Learning", ICLR 2025).

Rule: only ``A`` is shared: ``Ā = Σ p_k A_k`` is what every client starts the next round's ``A``
from, while each client keeps its own ``B_k`` across rounds (``A`` learns what clients share,
``B`` what is their own, the paper's analysis). The client side (:mod:`fedlora.clients.fedsa`)
keeps ``B_k`` in the client's state (a file per client in-process, ``context.state`` on a Flower
node) and replaces the start's ``B`` with it; a client's first round starts from ``B = 0``. Only
``Ā`` travels down. In rounds due for evaluation each client's own model is scored on the
held-out set as the official code (FederatedScope) does, after the server's broadcast, on
``(Ā, B_k)`` with the new ``Ā`` (``personal_*`` metrics), and also right after its training, on
``(A_k, B_k)`` (``personal_local_*``); the global model is ``(Ā, B̄)`` with the mean
``B̄ = Σ p_k B_k`` (FedIT's average, here the mean of what the clients keep).

Deviation: the paper's clients upload only ``A``; here they also upload ``B_k`` so the server can
form and export the global model with the mean ``B̄`` (counted as traffic: FedSA's upload equals
FedIT's, its download is ``A`` alone); ``B̄`` is never sent back. Equal ranks, as in the paper.
"""

from __future__ import annotations

from fedlora.strategies.base import Traits, register
from fedlora.strategies.fedit import FedIT


@register
class FedSALoRA(FedIT):
    name = "fedsa"
    traits = Traits(paper="Guo et al. 2025 (FedSA-LoRA)", mixed_ranks=False)

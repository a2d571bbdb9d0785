"""The attacks of the red-team suite (``tests/test_red_team.py``): a SuperNode whose node config
says ``attack = NAME`` runs fedlora's own ClientApp and then alters its reply as a malicious
party would. Each attack is what the server must survive without anyone's help."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

Attack = Callable[[str, RecordDict], RecordDict]


def _arrays(reply: RecordDict, change: Callable[[str, np.ndarray], np.ndarray]) -> None:
    record = reply.array_records["factors"]
    reply["factors"] = ArrayRecord({k: Array(change(k, record[k].numpy())) for k in record})


def inflate_count(kind: str, reply: RecordDict) -> RecordDict:
    """Joins honestly, then claims 2^62 examples with every update (a weight of about 1)."""
    if kind == "train":
        reply.config_records["result"]["num_examples"] = 2**62
    return reply


def steal_slot(kind: str, reply: RecordDict) -> RecordDict:
    """Calls itself client-0000 (another node's slot) when the server asks who it is."""
    if kind == "query":
        reply.config_records["client"]["cid"] = "client-0000"
    return reply


def nan_update(kind: str, reply: RecordDict) -> RecordDict:
    """Sends its factors with one NaN in every B."""

    def poison(key: str, a: np.ndarray) -> np.ndarray:
        a = a.copy()
        if key.endswith(".B"):
            a.flat[0] = np.nan
        return a

    if kind == "train":
        _arrays(reply, poison)
    return reply


def huge_update(kind: str, reply: RecordDict) -> RecordDict:
    """Sends its update 10^4 times larger: finite, the right shapes, far above the others."""
    if kind == "train":
        _arrays(reply, lambda key, a: a * np.float32(1e4) if key.endswith(".B") else a)
    return reply


def malformed(kind: str, reply: RecordDict) -> RecordDict:
    """Sends a string where its loss goes and a list where its count goes."""
    if kind == "train":
        result = reply.config_records["result"]
        reply["result"] = ConfigRecord({**dict(result), "loss": "low", "num_examples": [1, 2]})
    return reply


def oversized(kind: str, reply: RecordDict) -> RecordDict:
    """Sends an A of 4,096 rows, far more than the rank it was asked to train."""
    if kind == "train":
        _arrays(
            reply,
            lambda key, a: np.zeros((4096, a.shape[1]), a.dtype) if key.endswith(".A") else a,
        )
    return reply


ATTACKS: dict[str, Attack] = {
    "inflate-count": inflate_count,
    "steal-slot": steal_slot,
    "nan-update": nan_update,
    "huge-update": huge_update,
    "malformed": malformed,
    "oversized": oversized,
}


def install(client: ModuleType) -> None:
    """Wrap ``client._reply`` (fedlora's ClientApp) so that a node config's ``attack`` runs."""
    honest_reply: Callable[[str, Message, Context], RecordDict] = client._reply

    def reply(kind: str, msg: Message, context: Context) -> RecordDict:
        attack = context.node_config.get("attack")
        if attack is None:
            return honest_reply(kind, msg, context)
        node_config: dict[str, Any] = {
            k: v for k, v in context.node_config.items() if k != "attack"
        }
        honest = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=node_config,
            state=context.state,
            run_config=context.run_config,
        )
        return ATTACKS[str(attack)](kind, honest_reply(kind, msg, honest))

    client._reply = reply

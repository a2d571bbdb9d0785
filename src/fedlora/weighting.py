"""Client weights ``p_k`` for a round: by data size (default), uniform, or given per client."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, TypeAlias

from fedlora.errors import UpdateError
from fedlora.lora import ClientUpdate

Weighting: TypeAlias = Literal["examples", "uniform"] | Mapping[str, float]
"""``"examples"``: ``p_k = n_k / Σ n``; ``"uniform"``: ``p_k = 1 / K``; a mapping: given raw
weights per client id, normalised over the clients of the round."""

WEIGHTING_NAMES = ("examples", "uniform")


def client_id(index: int) -> str:
    """The id of registered client ``index``, on every engine."""
    return f"client-{index:04d}"


def configured_weighting(
    weighting: str, weights: Sequence[float] | None, num_clients: int
) -> Weighting:
    """The weighting a config asks for: a name, or with ``custom`` the raw weight of every
    registered client (``weights`` repeated cyclically)."""
    if weighting != "custom":
        return weighting  # type: ignore[return-value]
    if not weights:
        raise UpdateError('weighting = "custom" needs clients.weights')
    return {client_id(k): float(weights[k % len(weights)]) for k in range(num_clients)}


def client_weights(
    updates: Sequence[ClientUpdate], weighting: Weighting = "examples"
) -> list[float]:
    """Normalised weights ``p_k`` (summing to 1) for ``updates``, in their order.

    Raises :class:`UpdateError` naming the client for a missing, zero, negative or non-finite
    given weight.
    """
    if not updates:
        raise UpdateError("no client updates to weight (the client list is empty)")
    if isinstance(weighting, str):
        if weighting == "examples":
            raw = [float(u.num_examples) for u in updates]
        elif weighting == "uniform":
            raw = [1.0] * len(updates)
        else:
            raise UpdateError(
                f"unknown weighting {weighting!r}; expected one of {list(WEIGHTING_NAMES)} "
                "or a mapping client id -> weight"
            )
    else:
        raw = []
        for u in updates:
            if u.client_id not in weighting:
                raise UpdateError(
                    f"no weight given for this client; given for {sorted(weighting)}",
                    client=u.client_id,
                )
            raw.append(float(weighting[u.client_id]))
    for u, w in zip(updates, raw, strict=True):
        if not math.isfinite(w) or w <= 0:
            raise UpdateError(
                f"client weight must be a positive finite number, got {w}", client=u.client_id
            )
    total = math.fsum(raw)
    return [w / total for w in raw]

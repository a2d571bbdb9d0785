"""The run's random streams: every generator is seeded from the run's seed and a named stream.

No global RNG is seeded anywhere; each stream below is one use, so adding a use never shifts
another's numbers. A client's local training (its adapter's init and its batches) is seeded by
``derive_seed(seed, round, client index)``, the other streams by ``derive_seed(seed, STREAM, …)``.
"""

from __future__ import annotations

import torch

SAMPLER = 1
"""Which clients each round samples (federated and standalone runs)."""
SHARED_INIT = 2
"""The shared initial adapter every client starts from (``Strategy.init_state``)."""
FAULTS = 3
"""The injected faults of the in-process simulation (``[faults]``)."""


def derive_seed(*parts: int) -> int:
    """A deterministic seed from integers (no global RNG)."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + p) % (2**63 - 1)
    return value


def generator(seed: int, stream: int, *parts: int) -> torch.Generator:
    """A fresh CPU generator for ``stream`` of the run seeded ``seed`` (and ``parts``)."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, *parts))

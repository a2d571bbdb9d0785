"""Client LoRA ranks: an explicit list, or the papers' heterogeneous distributions.

- ``flora``: FLoRA's ``[64, 32, 16, 16, 8, 8, 4, 4, 4, 4]`` (repeated cyclically for more clients).
- FlexLoRA's distributions over a sorted rank set ``t_1 < … < t_m`` (its "resource types"):
  ``uniform`` (each type equally likely), ``heavy-tail-light`` (80 % the smallest type, the rest
  uniform over the others), ``heavy-tail-strong`` (80 % the largest type), ``normal`` (binomial
  weights ``C(m-1, i)``, so the middle types dominate). Sampled per client from a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora.devices import HOST
from fedlora.errors import ConfigError

FLORA_RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)
DISTRIBUTIONS = ("flora", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal")


def type_probabilities(name: str, num_types: int) -> list[float]:
    """Probability of each rank type (sorted ascending) under distribution ``name``."""
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"clients.ranks = {name!r} is no rank distribution; choose one of "
            f"{', '.join(DISTRIBUTIONS)} or give a list of ranks"
        )
    m = num_types
    if name == "uniform" or m == 1:
        return [1.0 / m] * m
    if name == "heavy-tail-light":
        return [0.8] + [0.2 / (m - 1)] * (m - 1)
    if name == "heavy-tail-strong":
        return [0.2 / (m - 1)] * (m - 1) + [0.8]
    if name == "normal":
        weights = [math.comb(m - 1, i) for i in range(m)]
        return [w / sum(weights) for w in weights]
    raise AssertionError(name)  # pragma: no cover - every name in DISTRIBUTIONS is handled


def client_ranks(
    spec: Sequence[int] | str, num_clients: int, rank_set: Sequence[int], seed: int
) -> list[int]:
    """One rank per client: ``spec`` as an explicit list (cycled) or a distribution name."""
    if isinstance(spec, str):
        if spec == "flora":
            return [FLORA_RANKS[i % len(FLORA_RANKS)] for i in range(num_clients)]
        types = sorted(set(rank_set))
        if not types or types[0] < 1:
            raise ConfigError(f"clients.rank_set must hold ranks >= 1, got {list(rank_set)}")
        probs = torch.tensor(type_probabilities(spec, len(types)), dtype=torch.float64, device=HOST)
        generator = torch.Generator().manual_seed(seed)
        picks = torch.multinomial(probs, num_clients, replacement=True, generator=generator)
        return [types[i] for i in picks.tolist()]
    ranks = list(spec)
    if not ranks:
        raise ConfigError("clients.ranks is empty; give one rank per client or a distribution")
    return [ranks[i % len(ranks)] for i in range(num_clients)]

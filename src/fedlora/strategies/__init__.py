"""Aggregation strategies, one file each, selected by name from :data:`REGISTRY`."""

from fedlora.strategies import (
    fedex,
    fedit,
    fedsa,
    ffa,
    flexlora,
    flora,
    florist,
    hafl,
    hafl_freeze,
    hafl_truncate,
    hetlora,
    rolora,
    zeropad,
)
from fedlora.strategies.base import (
    REGISTRY,
    GlobalState,
    RankSpec,
    Start,
    Strategy,
    Traits,
    get_strategy,
)
from fedlora.strategies.fedit import fedit_aggregation_error

__all__ = [
    "REGISTRY",
    "GlobalState",
    "RankSpec",
    "Start",
    "Strategy",
    "Traits",
    "fedex",
    "fedit",
    "fedit_aggregation_error",
    "fedsa",
    "ffa",
    "flexlora",
    "flora",
    "florist",
    "get_strategy",
    "hafl",
    "hafl_freeze",
    "hafl_truncate",
    "hetlora",
    "rolora",
    "zeropad",
]

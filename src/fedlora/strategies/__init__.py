"""The server half of every method: the :class:`Strategy` base (pure aggregation math), its
:class:`Traits` and the registry the methods fill. The methods themselves, one file each, are in
:mod:`fedlora.methods`; take ``REGISTRY`` and ``get_strategy`` from there, which imports them.
"""

from fedlora.strategies.base import GlobalState, RankSpec, Start, Strategy, Traits

__all__ = ["GlobalState", "RankSpec", "Start", "Strategy", "Traits"]

"""Every method, one file each: its server strategy (pure math, :mod:`fedlora.strategies.base`),
its client hook where its clients do more than train a plain LoRA (:mod:`fedlora.clients.base`),
and its option section (:func:`fedlora.schema.method_options`) together, as PEFT keeps a tuner
and Flower a strategy. Importing a method's file registers it; the lines below are the registry.

Adding a method is one file here and one line below (docs/algorithms.md, "Adding a method").
"""

from __future__ import annotations

from fedlora.clients.base import ClientHook
from fedlora.methods import fedex as fedex
from fedlora.methods import fedit as fedit
from fedlora.methods import fedsa as fedsa
from fedlora.methods import fedsrd as fedsrd
from fedlora.methods import fedsvd as fedsvd
from fedlora.methods import ffa as ffa
from fedlora.methods import flexlora as flexlora
from fedlora.methods import flora as flora
from fedlora.methods import flora_adalora as flora_adalora
from fedlora.methods import florist as florist
from fedlora.methods import hafl as hafl
from fedlora.methods import hetlora as hetlora
from fedlora.methods import rolora as rolora
from fedlora.methods import zeropad as zeropad
from fedlora.methods.fedit import fedit_aggregation_error
from fedlora.strategies.base import REGISTRY, Strategy, get_strategy

HOOKS: dict[str, type[ClientHook]] = {
    name: cls.client for name, cls in REGISTRY.items() if cls.client is not None
}
"""Each method's client hook, by strategy name (a method whose clients train a plain LoRA has
none: :class:`ClientHook` serves it)."""


def hook_for(strategy: str) -> type[ClientHook]:
    """The client hook of ``strategy`` (the default :class:`ClientHook` for a method without
    one, and for ``centralized`` and ``standalone`` training)."""
    return HOOKS.get(strategy, ClientHook)


__all__ = [
    "HOOKS",
    "REGISTRY",
    "Strategy",
    "fedit_aggregation_error",
    "get_strategy",
    "hook_for",
]

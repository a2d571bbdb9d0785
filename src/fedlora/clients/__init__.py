"""Client hooks, one file per method whose clients do more than train a plain LoRA, registered
by strategy name in :data:`HOOKS` (:mod:`fedlora.clients.base`)."""

from fedlora.clients import adalora, fedsa, ffa, hafl, hetlora, rolora
from fedlora.clients.base import (
    HOOKS,
    Callbacks,
    ClientHook,
    ClientState,
    LocalPlan,
    Session,
    Upload,
    hook_for,
    register_hook,
)

__all__ = [
    "HOOKS",
    "Callbacks",
    "ClientHook",
    "ClientState",
    "LocalPlan",
    "Session",
    "Upload",
    "adalora",
    "fedsa",
    "ffa",
    "hafl",
    "hetlora",
    "hook_for",
    "register_hook",
    "rolora",
]

"""The client half of every method: the :class:`ClientHook` steps a client runs around its local
training, and what travels (:class:`Upload`, :class:`LocalPlan`). A method's own hook lives in its
file in :mod:`fedlora.methods` (its strategy's ``client``); take ``hook_for`` from there.
"""

from fedlora.clients.base import (
    Callbacks,
    ClientHook,
    ClientState,
    LocalPlan,
    Session,
    Upload,
)

__all__ = ["Callbacks", "ClientHook", "ClientState", "LocalPlan", "Session", "Upload"]

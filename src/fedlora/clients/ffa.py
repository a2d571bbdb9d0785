"""FFA-LoRA's clients (Sun et al., ICLR 2024; the server side is :mod:`fedlora.strategies.ffa`):
``A`` stays at the shared ``A_0``, only ``B`` trains and travels."""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.clients.base import ClientHook, Scalar, register_hook


@register_hook("ffa")
class FreezeAClient(ClientHook):
    @classmethod
    def sent(cls, options: Mapping[str, Scalar]) -> tuple[str, ...]:
        del options
        return ("B",)

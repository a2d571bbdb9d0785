"""RoLoRA's clients (the server side is :mod:`fedlora.strategies.rolora`): each round they train
and send only the factor the plan's ``train`` option names; the default hook freezes the other,
privacy noises only the sent one and traffic counts only it."""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.clients.base import ClientHook, Scalar, register_hook


@register_hook("rolora")
class AlternatingClient(ClientHook):
    @classmethod
    def sent(cls, options: Mapping[str, Scalar]) -> tuple[str, ...]:
        part = options.get("train")
        if part not in ("A", "B"):
            raise ValueError(f"rolora: the plan option 'train' must be 'A' or 'B', got {part!r}")
        return (str(part),)

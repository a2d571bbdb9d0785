"""HAFL's clients (Yan et al. 2024; the server side is :mod:`fedlora.strategies.hafl_truncate`
and :mod:`fedlora.strategies.hafl_freeze`): they track each component's importance during local
training (:mod:`fedlora.importance`) and send it with their factors."""

from __future__ import annotations

from typing import Any

from fedlora.clients.base import Callbacks, ClientHook, Upload, register_hook


@register_hook("hafl-truncate", "hafl-freeze")
class ImportanceClient(ClientHook):
    also_sends = "importance scores"

    def prepare(self, peft_model: Any) -> Callbacks:
        from fedlora import adapters

        super().prepare(peft_model)
        self.tracker = adapters.importance_tracker(peft_model)
        return Callbacks(on_step=self.tracker.step)

    def read(self, peft_model: Any) -> Upload:
        upload = super().read(peft_model)
        return Upload(upload.factors, upload.kept, importance=self.tracker.scores())

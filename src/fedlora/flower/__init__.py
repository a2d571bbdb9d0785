"""fedlora on Flower: the apps, their messages, the launcher and the nodes' model keepers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_KEY = "fedlora-config"
"""The Flower run-config key that carries the resolved fedlora config as JSON."""
OUT_KEY = "out"
"""The run-config key that carries the run folder on the server's host."""
FEDLORA_RECORD = "fedlora"
"""The key of the record every message of :class:`fedlora.flower.strategy.FedLoRA` carries:
``config``, the run's fedlora config as JSON (what :mod:`fedlora.flower.client_side` trains
by)."""
RESUME_KEY = "resume"
"""The run-config key that says whether the ServerApp resumes the run folder's checkpoint."""


def trusts_server(node_config: Mapping[str, Any]) -> bool:
    """Whether a node lets the server choose its data and its privacy, and see its errors in
    full: its node config says ``trust-server = true`` (a local deployment that fedlora starts
    sets it: one party), or it runs on Flower's simulation engine (which gives every node
    ``num-partitions``: one machine, one party)."""
    return node_config.get("trust-server") is True or "num-partitions" in node_config

"""Errors that name their culprit: which client, which module, what was expected."""

from __future__ import annotations


class FedloraError(Exception):
    """Base class of every error fedlora raises on purpose."""


class UpdateError(FedloraError, ValueError):
    """A client update (or a set of them) that cannot be aggregated.

    ``client`` and ``module`` name the culprit where one exists; the message says what was
    expected. Raising it never changes any global state: strategies validate before they compute.
    """

    def __init__(self, message: str, *, client: str | None = None, module: str | None = None):
        where = []
        if client is not None:
            where.append(f"client {client!r}")
        if module is not None:
            where.append(f"module {module!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.client = client
        self.module = module


class ConfigError(FedloraError, ValueError):
    """A setting that is unknown or out of range; the message lists what is allowed."""

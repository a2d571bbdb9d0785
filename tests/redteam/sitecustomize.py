"""Imported by every Python process of a red-team test (the test puts this folder first on the
``PYTHONPATH`` of the Flower processes it starts): when a process imports fedlora's ClientApp,
:mod:`fedlora_redteam` wraps its reply, so that a SuperNode whose node config names an
``attack`` answers as a malicious party would (one that runs modified code). Nothing here runs
in the test process itself or outside the red-team tests."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

TARGET = "fedlora.flower.client"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            import fedlora_redteam

            fedlora_redteam.install(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _Finder())

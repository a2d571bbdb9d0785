"""Methods are pure math: no peft, transformers or flwr anywhere in their import graph (a client
hook reaches PEFT only through :mod:`fedlora.adapters`, imported where it touches a model)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedlora

FORBIDDEN = ("peft", "transformers", "flwr", "datasets", "flwr_datasets")
PACKAGE = Path(fedlora.__file__).parent
PURE = [PACKAGE / "lora.py", PACKAGE / "linalg.py", PACKAGE / "weighting.py", PACKAGE / "errors.py"]
PURE += sorted((PACKAGE / "strategies").glob("*.py")) + sorted((PACKAGE / "methods").glob("*.py"))


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_pure_modules_import_no_framework() -> None:
    assert len(PURE) >= 11
    for path in PURE:
        bad = imported_roots(path) & set(FORBIDDEN)
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_methods_loads_no_framework() -> None:
    code = (
        "import sys, fedlora.methods; "
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == ""

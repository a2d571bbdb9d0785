"""A method's seams: one file of :mod:`fedlora.methods` (its strategy, client hook and options);
nothing else names it.

The runners (rounds, simulation, Flower apps and records, experiment) must hold no method's name
and import no method's module; the package's imports, deferred ones included, form no cycle;
config errors of the rank and method-option kinds are found by ``load_config``, before anything
loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora import privacy
from fedlora.clients import ClientHook
from fedlora.config import METHOD_OPTIONS, PrivacyConfig, load_config, options_of, to_dict
from fedlora.errors import ConfigError
from fedlora.lora import LoRAFactors
from fedlora.methods import HOOKS, REGISTRY, hook_for
from fedlora.methods.flora_adalora import AdaLoRAOptions
from fedlora.methods.hetlora import HetLoRAOptions

PACKAGE = Path(__file__).parents[1] / "src" / "fedlora"
RUNNERS = ["rounds.py", "simulation.py", "experiment.py", "train.py", "flower/apps.py"]
RUNNERS += ["flower/records.py", "flower/launch.py", "checkpoint.py", "privacy.py"]
RUNNERS += ["federation.py", "flower/strategy.py"]
METHOD_MODULES = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """fedlora modules ``path`` imports anywhere: at module level and deferred inside functions
    alike (a deferred import is a cycle postponed, not removed); only ``if TYPE_CHECKING:``
    blocks, which never run, are left out."""
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for n in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fedlora")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module is not None
            and node.level == 0
            and node.module.startswith("fedlora")
        ):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of it that it imports (``from pkg import x``
    counts as importing ``pkg.x`` where that is a module, else ``pkg``)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for m, p in modules.items():
        edges = set()
        for name in imports_of(p):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != m:
                edges.add(name)
        graph[m] = edges
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def test_every_hook_belongs_to_a_registered_strategy_and_others_get_the_default() -> None:
    assert set(HOOKS) <= set(REGISTRY)
    assert {"hetlora", "flora-adalora", "ffa", "hafl-truncate", "hafl-freeze"} <= set(HOOKS)
    assert hook_for("flora") is ClientHook and hook_for("centralized") is ClientHook
    assert hook_for("ffa").sent({}) == ("B",) and ClientHook.sent({}) == ("A", "B")


def test_the_runners_name_no_method_and_import_no_method_module() -> None:
    names = set(REGISTRY)
    for rel in RUNNERS:
        path = PACKAGE / rel
        tree = ast.parse(path.read_text())
        literals = {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        assert not literals & names, f"{rel} names {sorted(literals & names)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.split(".")
                if mod[:2] == ["fedlora", "methods"] and len(mod) > 2:
                    raise AssertionError(f"{rel} imports {node.module}")


def test_nothing_outside_the_methods_imports_a_method_module() -> None:
    assert {"flora", "hetlora", "hafl", "flora_adalora"} <= METHOD_MODULES
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.split(".")
                if mod[:2] == ["fedlora", "methods"] and len(mod) > 2:
                    assert mod[2] not in METHOD_MODULES, f"{path.name} imports {node.module}"


def test_the_package_has_no_import_cycle_deferred_imports_included() -> None:
    graph = import_graph(PACKAGE)
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    assert "fedlora.rounds" in graph and "fedlora.privacy" in graph
    # the schema is the bottom: it imports no method, and every method imports it, not the loader
    assert graph["fedlora.schema"] <= {"fedlora.errors"}
    for name in METHOD_MODULES:
        assert "fedlora.config" not in graph[f"fedlora.methods.{name}"], name


def test_the_cycle_check_sees_a_cycle_made_of_deferred_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "fedlora"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import fedlora.b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import fedlora.a\n"  # never runs: no edge
        "def f():\n    from fedlora.c import g\n"
    )
    (pkg / "c.py").write_text("def g():\n    from fedlora import a\n")
    graph = import_graph(pkg)
    assert graph == {
        "fedlora": set(),
        "fedlora.a": {"fedlora.b"},
        "fedlora.b": {"fedlora.c"},
        "fedlora.c": {"fedlora", "fedlora.a"},  # from fedlora import a: the package, then a
    }
    assert import_cycle(graph) == ["fedlora.a", "fedlora.b", "fedlora.c", "fedlora.a"]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert import_cycle(import_graph(pkg)) is None


def test_one_driver_serves_both_engines_and_flower_never_loads_the_inprocess_one() -> None:
    # both engines build the server side with federation.server_rounds and run it with
    # FederatedRounds.drive; neither writes its own round loop
    # (on Flower, fedlora's ServerApp drives the rounds its strategy class builds)
    for builds, drives in (("simulation.py",) * 2, ("flower/strategy.py", "flower/apps.py")):
        assert "server_rounds(" in (PACKAGE / builds).read_text(), builds
        assert ".drive(" in (PACKAGE / drives).read_text(), drives
        for rel in (builds, drives):
            text = (PACKAGE / rel).read_text()
            assert ".run_round(" not in text and "FederatedRounds(" not in text, rel
    code = (
        "import sys, fedlora.flower.apps, fedlora.experiment; "
        "print('fedlora.simulation' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reading_a_config_registers_the_method_options_without_loading_peft() -> None:
    code = (
        "import sys; from fedlora.config import load_config, METHOD_OPTIONS; load_config(); "
        "print(*sorted(METHOD_OPTIONS), 'peft' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *sections, peft, transformers = out.stdout.split()
    assert sections == sorted(METHOD_OPTIONS) and {"adalora", "florist", "hetlora"} <= set(sections)
    assert (peft, transformers) == ("False", "False")


def test_method_options_are_read_typed_and_written_back_at_the_top_level() -> None:
    cfg = load_config(overrides=["hetlora.gamma=0.5", "adalora.delta_t=3"])
    assert options_of(cfg, HetLoRAOptions).gamma == 0.5
    assert options_of(cfg, AdaLoRAOptions).delta_t == 3
    data = to_dict(cfg)
    assert data["hetlora"]["gamma"] == 0.5 and "methods" not in data
    assert set(METHOD_OPTIONS) <= set(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["clients.ranks=flroa"], r"clients.ranks = 'flroa' is no rank distribution"),
        (["clients.ranks=unifrom", "strategy=hetlora"], "is no rank distribution"),
        (  # a one-type rank set skipped the name check before
            ["clients.ranks=nromal", "clients.rank_set=[8]", "strategy=flexlora"],
            "is no rank distribution",
        ),
        (["clients.ranks=uniform", "clients.rank_set=[0, 4]"], r"rank_set must hold ranks >= 1"),
        (["clients.ranks=uniform", "clients.rank_set=[]"], r"rank_set must hold ranks >= 1"),
        (["hetlora.gama=0.5"], r"unknown config key 'hetlora.gama'; allowed in hetlora: gamma"),
        (["hetlora.gamma=yes"], r"hetlora.gamma: expected float"),
        (["adalora.delta_t=0"], r"adalora.delta_t must be >= 1"),
        (["lora.rank=4"], r"unknown config key 'lora'; allowed in the top level: adalora, clients"),
        (["methods.hetlora=1"], r"unknown config key 'methods'"),
        (["privacy.clip_norm=1", "strategy=hafl-freeze"], "also send importance scores"),
    ],
)
def test_config_errors_are_found_before_anything_loads(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_privacy_noises_only_the_sent_factor() -> None:
    g = torch.Generator().manual_seed(0)
    start = {"m": LoRAFactors(A=torch.randn(2, 5, generator=g), B=torch.randn(4, 2, generator=g))}
    trained = {"m": LoRAFactors(A=start["m"].A + 1.0, B=start["m"].B + 100.0)}
    cfg = PrivacyConfig(clip_norm=1.0, noise_multiplier=0.5)
    got, norm = privacy.privatize(start, trained, cfg, torch.Generator().manual_seed(1), ("A",))
    assert norm == pytest.approx(float(torch.linalg.norm(trained["m"].A - start["m"].A)))
    assert torch.equal(got["m"].B, trained["m"].B)  # B frozen: passed through, not counted
    assert not torch.equal(got["m"].A, trained["m"].A)


@pytest.mark.parametrize("engine", ["inprocess", "flower"])
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("clients.ranks=flroa", "clients.ranks = 'flroa' is no rank distribution"),
        ("hetlora.gama=0.5", "unknown config key 'hetlora.gama'"),
    ],
)
def test_both_engines_refuse_a_bad_config_before_starting(
    engine: str,
    override: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedlora.cli import main

    tiny = str(Path(__file__).parents[1] / "configs" / "tiny.toml")
    out = tmp_path / "x"
    code = main(["run", tiny, "--engine", engine, "--set", override, "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fedlora: error: {message}")
    assert not out.exists()  # nothing started, nothing written

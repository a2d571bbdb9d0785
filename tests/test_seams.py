"""A method's seams: its server file (a strategy) and its client hook; nothing else names it.

The runners (rounds, simulation, Flower apps and records, experiment) must hold no method's name
and import no method's module; the package's module-level imports form no cycle; config errors of
the rank and method-option kinds are found by ``load_config``, before anything loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora import privacy
from fedlora.clients import HOOKS, ClientHook, hook_for
from fedlora.clients.adalora import AdaLoRAOptions
from fedlora.clients.hetlora import HetLoRAOptions
from fedlora.config import METHOD_OPTIONS, PrivacyConfig, load_config, options_of, to_dict
from fedlora.errors import ConfigError
from fedlora.lora import LoRAFactors
from fedlora.strategies import REGISTRY

PACKAGE = Path(__file__).parents[1] / "src" / "fedlora"
RUNNERS = ["rounds.py", "simulation.py", "experiment.py", "train.py", "flower/apps.py"]
RUNNERS += ["flower/records.py", "flower/launch.py", "checkpoint.py", "privacy.py"]
RUNNERS += ["federation.py"]
METHOD_MODULES = {p.stem for p in (PACKAGE / "strategies").glob("*.py")} - {"__init__", "base"}
METHOD_MODULES |= {p.stem for p in (PACKAGE / "clients").glob("*.py")} - {"__init__", "base"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """fedlora modules imported at module level (not inside functions or TYPE_CHECKING)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
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
                if mod[:2] in (["fedlora", "strategies"], ["fedlora", "clients"]) and len(mod) > 2:
                    assert mod[2] in ("base",), f"{rel} imports {node.module}"


def test_nothing_outside_strategies_and_clients_imports_a_method_module() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name in ("strategies", "clients"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.split(".")
                if mod[:2] in (["fedlora", "strategies"], ["fedlora", "clients"]) and len(mod) > 2:
                    assert mod[2] not in METHOD_MODULES, f"{path.name} imports {node.module}"


def test_the_package_has_no_module_level_import_cycle() -> None:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        m: {i for i in top_level_imports(p) if i in modules and i != m} for m, p in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "fedlora.rounds" in graph and "fedlora.privacy" in graph


def test_one_driver_serves_both_engines_and_flower_never_loads_the_inprocess_one() -> None:
    # both engines build the server side with federation.server_rounds and run it with
    # FederatedRounds.drive; neither writes its own round loop
    for rel in ("simulation.py", "flower/apps.py"):
        text = (PACKAGE / rel).read_text()
        assert "server_rounds(" in text and ".drive(" in text, rel
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
        "print(sorted(METHOD_OPTIONS), 'peft' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['adalora', 'florist', 'hetlora'] False False"


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

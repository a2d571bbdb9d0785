"""The red-team suite: scripted malicious SuperNodes in a real Flower deployment (a SuperLink and
one SuperNode process per client, on the tiny model), one per attack of issue 33. Each runs
fedlora's own ClientApp and then alters its reply (``tests/redteam/fedlora_redteam.py``). The
run completes; every attacker is named in ``metrics.jsonl`` (refused: ``failed``; overridden:
``flagged``); and the honest clients' global adapter is the one they make without the refused
attackers (the in-process run in which those clients fail every round).

One honest node does not trust the server (the server as attacker: it names the data a node
should train on): it trains on a file of its own, which holds what its partition would, and
ignores the server's ``data.source``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedlora import simulation
from fedlora.config import load_config
from fedlora.experiment import run_experiment
from fedlora.federation import federation_data
from fedlora.flower.launch import Processes, free_ports, submit, write_connection
from fedlora.rounds import Task

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
REDTEAM = Path(__file__).parent / "redteam"

HONEST = 3
ATTACKS = ["inflate-count", "steal-slot", "nan-update", "huge-update", "malformed", "oversized"]
"""Node ``HONEST + i`` runs ``ATTACKS[i]``."""
REFUSED = {  # the attacks whose updates never reach the global model, and why, in its words
    "nan-update": "NaN/Inf values",
    "huge-update": "validation.norm_ratio",
    "malformed": "num_examples must be an int >= 1, got [1, 2]",
    "oversized": "does not fit module",
}
OVERRIDES = [
    f"clients.num_clients={HONEST + len(ATTACKS)}",
    "clients.ranks=[4]",
    "clients.fraction=1.0",
    f"clients.min_clients={HONEST}",
    "rounds=2",
]


def cid(index: int) -> str:
    return f"client-{index:04d}"


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployment with the attackers (made once for the module's tests)."""
    out = tmp_path_factory.mktemp("red-team") / "run"
    home = out.resolve() / "flower"
    cfg = load_config(TINY, OVERRIDES)
    own = out.parent / "node-2.jsonl"  # node 2's own data: what its partition would hold
    own.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "response": e.response, "category": e.category}) + "\n"
            for e in federation_data(cfg).parts[2]
        )
    )
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REDTEAM), *([path] if path else [])])
    try:
        with Processes(home, home / "logs") as procs:
            link, *ports = free_ports(1 + HONEST + len(ATTACKS))
            address = procs.superlink(link)
            write_connection(home, address)
            for k in range(HONEST + len(ATTACKS)):
                node: dict[str, Any] = {"partition-id": k, "trust-server": True, "keep-model": True}
                if k == 2:  # trusts the server with nothing: trains on its own file
                    node.update({"trust-server": False, "data": str(own)})
                if k >= HONEST:
                    node["attack"] = ATTACKS[k - HONEST]
                procs.supernode(k, address, node, ports[k])
            submit(cfg, out, address, echo=False)
    finally:
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path
    return out


def test_every_attacker_is_refused_or_overridden_by_name_and_the_run_completes(
    attacked: Path,
) -> None:
    got = rows(attacked)
    assert [r["round"] for r in got] == [0, 1, 2]
    refused = {cid(HONEST + ATTACKS.index(a)): why for a, why in REFUSED.items()}
    for row in got[1:]:
        assert set(row["failed"]) == set(refused), row["failed"]
        for client, why in refused.items():
            assert why in row["failed"][client], (client, row["failed"][client])
        assert row["clients"] == [cid(k) for k in range(HONEST + 2)]
        inflated = cid(HONEST + ATTACKS.index("inflate-count"))
        assert row["flagged"] == {
            inflated: f"reported {2**62} examples; weighed by the "
            f"{_joined(attacked, inflated)} it joined with"
        }
    thief = HONEST + ATTACKS.index("steal-slot")
    assert got[0]["flagged"] == {
        cid(thief): f"node {_node(attacked, cid(thief))} called itself 'client-0000'; it is "
        f"{cid(thief)}, the slot of its partition-id {thief}"
    }
    summary = json.loads((attacked / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["nodes"][cid(0)] != summary["nodes"][cid(thief)]


def test_the_honest_clients_result_is_what_they_make_without_the_refused_attackers(
    attacked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = {HONEST + ATTACKS.index(a) for a in REFUSED}

    def fault(cfg: object, task: Task) -> str | None:
        return "crash_before" if task.client.index in refused else None

    monkeypatch.setattr(simulation, "injected_fault", fault)
    run_experiment(load_config(TINY, OVERRIDES), tmp_path / "honest", progress=False)

    got = load_file(str(attacked / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "honest" / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["eval_loss"] for r in rows(attacked)] == pytest.approx(
        [r["eval_loss"] for r in rows(tmp_path / "honest")], rel=1e-5
    )


def _joined(out: Path, client: str) -> int:
    summary = json.loads((out / "summary.json").read_text())
    return int(next(c["examples"] for c in summary["clients"] if c["id"] == client))


def _node(out: Path, client: str) -> int:
    return int(json.loads((out / "summary.json").read_text())["nodes"][client])

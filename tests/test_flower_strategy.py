"""fedlora's methods as Flower strategies (``fedlora.flower.strategy.FedLoRA``), run by Flower's
own ``Strategy.start`` over a grid whose nodes are fedlora's node handler in this process: the
same run as the in-process engine, and a node's failure fails its client, not the round."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from safetensors.torch import load_file

from fedlora.config import RunConfig, load_config, to_dict
from fedlora.experiment import run_experiment
from fedlora.flower import CONFIG_KEY, apps
from fedlora.flower.strategy import CONFIG_RECORD, FedLoRA
from fedlora.methods import REGISTRY

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def tiny(strategy: str, *extra: str) -> RunConfig:
    ranks = "[8, 4, 2]" if REGISTRY[strategy].traits.mixed_ranks else "[4]"
    return load_config(TINY, [f"strategy={strategy}", f"clients.ranks={ranks}", *extra])


class LocalGrid:
    """A Flower grid whose nodes answer in this process with fedlora's node handler (each its
    own Flower ``Context``); ``failing``: node ids whose replies to ``train`` are errors.
    Replies carry what a strategy reads of a Flower reply: the sender, the message answered,
    content or error."""

    def __init__(self, cfg: RunConfig, failing: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        run_config = {CONFIG_KEY: json.dumps(to_dict(cfg))}
        self.contexts = {
            100 + k: Context(1, 100 + k, {"partition-id": k, "trust-server": True}, RecordDict(),
                             run_config)  # type: ignore[arg-type]
            for k in range(cfg.clients.num_clients)
        }  # fmt: skip
        self.failing = failing
        self.sent: list[Message] = []
        self._ids = itertools.count()
        self._replies: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def _reply(self, msg: Message, mid: str) -> Any:
        node = msg.metadata.dst_node_id
        self.sent.append(msg)
        error = None
        content = None
        if node in self.failing and msg.metadata.message_type == "train":
            error = SimpleNamespace(reason="the node's process was killed")
        else:
            content = apps.node_handle(msg.metadata.message_type, msg.content, self.contexts[node])
        meta = SimpleNamespace(src_node_id=node, reply_to_message_id=mid)
        return SimpleNamespace(metadata=meta, content=content, error=error,
                               has_error=lambda: error is not None)  # fmt: skip

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = str(next(self._ids))
            self._replies[mid] = self._reply(msg, mid)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        return [self._replies.pop(i) for i in ids]

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Any]:
        return self.pull_messages(self.push_messages(list(messages)))


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built as inside a Flower run (which sets the run's identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["flora", "flexlora", "hafl-freeze"])
def test_flowers_own_start_runs_a_fedlora_method_as_the_inprocess_engine_does(
    strategy: str, tmp_path: Path
) -> None:
    cfg = tiny(strategy)
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    snapshots = []
    fed = FedLoRA(cfg, on_round=lambda record, snapshot: snapshots.append(snapshot))
    grid = LocalGrid(cfg)

    result = fed.start(grid, ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    rows = _rows(tmp_path / "inprocess")
    assert [r.round for r in fed.records] == [row["round"] for row in rows] == [0, 1, 2]
    for record, row in zip(fed.records, rows, strict=True):
        assert record.clients == row.get("clients", [])
        assert record.metrics["loss"] == pytest.approx(row["eval_loss"], rel=1e-6)
    # the whole server state after the last round, as the in-process checkpoint holds it
    want = load_file(str(tmp_path / "inprocess" / "checkpoint.safetensors"))
    got = snapshots[-1][0]
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Flower's Result: the global adapter and each round's figures
    exported, _ = fed._joined().export()
    assert sorted(result.arrays) == sorted(f"{m}.{f}" for m in exported for f in ("A", "B"))
    assert result.train_metrics_clientapp[2]["clients"] == len(fed.records[2].clients)
    # every train message carried the config record Flower passed (empty here)
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert trains and all(CONFIG_RECORD in m.content for m in trains)


def test_a_node_that_fails_fails_its_client_and_the_round_goes_on(tmp_path: Path) -> None:
    cfg = tiny("flora")
    fed = FedLoRA(cfg)
    grid = LocalGrid(cfg, failing={101})  # partition 1: client-0001

    fed.start(grid, ArrayRecord(), num_rounds=cfg.rounds, train_config=ConfigRecord({"x": 1}))  # type: ignore[arg-type]

    for record in fed.records[1:]:
        assert record.skipped is None
        assert record.failed == {"client-0001": "its node failed: the node's process was killed"}
        assert "client-0001" not in record.clients and len(record.clients) == 2
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(m.content[CONFIG_RECORD]["x"] == 1 for m in trains)

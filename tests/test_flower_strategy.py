"""fedlora's methods as Flower strategies (``fedlora.flower.strategy.FedLoRA``), run by Flower's
own ``Strategy.start`` over a grid whose nodes are fedlora's node handler in this process: the
same run as the in-process engine, and a node's failure fails its client, not the round."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from safetensors.torch import load_file

from fedlora.config import RunConfig, load_config, to_dict
from fedlora.errors import ConfigError, UpdateError
from fedlora.experiment import run_experiment
from fedlora.flower import CONFIG_KEY, apps, client_side
from fedlora.flower.launch import Processes, flwr_run, free_port, node_config_arg, write_connection
from fedlora.flower.strategy import CONFIG_RECORD, FedLoRA
from fedlora.methods import REGISTRY
from fedlora.models import load_configured

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def tiny(strategy: str, *extra: str) -> RunConfig:
    ranks = "[8, 4, 2]" if REGISTRY[strategy].traits.mixed_ranks else "[4]"
    return load_config(TINY, [f"strategy={strategy}", f"clients.ranks={ranks}", *extra])


Handler = Callable[[Message, Context], RecordDict]
"""What a node answers a message with: its reply's content."""


def fedloras_node(msg: Message, context: Context) -> RecordDict:
    """fedlora's own ClientApp's answer."""
    return apps.node_handle(msg.metadata.message_type, msg.content, context)


class LocalGrid:
    """A Flower grid whose nodes answer in this process with fedlora's node handler (each its
    own Flower ``Context``); ``failing``: node ids whose replies to ``train`` are errors.
    Replies carry what a strategy reads of a Flower reply: the sender, the message answered,
    content or error."""

    def __init__(
        self,
        cfg: RunConfig,
        failing: set[int] = frozenset(),  # type: ignore[assignment]
        handle: Handler | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        run_config = run_config or {CONFIG_KEY: json.dumps(to_dict(cfg))}
        n = cfg.clients.num_clients
        self.contexts = {
            100 + k: Context(1, 100 + k, {"partition-id": k, "num-partitions": n}, RecordDict(),
                             run_config)  # type: ignore[arg-type]
            for k in range(n)
        }  # fmt: skip
        self.failing = failing
        self.handle = handle or fedloras_node
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
            content = self.handle(msg, self.contexts[node])
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


def assert_same_run(fed: FedLoRA, snapshots: list[Any], inprocess: Path) -> None:
    """``fed``'s run is the in-process run in ``inprocess``: every round's clients and held-out
    loss, and the whole server state after the last round (``snapshots[-1]``, as the
    in-process checkpoint holds it)."""
    for record, row in zip(fed.records, _rows(inprocess), strict=True):
        assert record.clients == row.get("clients", [])
        assert record.metrics["loss"] == pytest.approx(row["eval_loss"], rel=1e-6)
    want = load_file(str(inprocess / "checkpoint.safetensors"))
    got = snapshots[-1][0]
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


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
    assert_same_run(fed, snapshots, tmp_path / "inprocess")
    # Flower's Result: the global adapter and each round's figures
    exported, _ = fed._joined().export()
    assert sorted(result.arrays) == sorted(f"{m}.{f}" for m in exported for f in ("A", "B"))
    assert result.train_metrics_clientapp[2]["clients"] == len(fed.records[2].clients)
    # every train message carried the config record Flower passed (empty here)
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert trains and all(CONFIG_RECORD in m.content for m in trains)


@pytest.mark.parametrize("node", ["fedlora", "example", "private"])
def test_each_node_reports_the_peak_memory_of_its_training(
    node: str, example: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node on CUDA (its allocator's statistics faked here) reports its training's peak, the
    window opened before it trains; a private node keeps it."""
    from fedlora import devices

    peaks = iter(float(mb) for mb in range(100, 1000, 10))
    opened: list[str] = []
    monkeypatch.setattr(devices, "reset_peak_memory", lambda device: opened.append(str(device)))
    monkeypatch.setattr(devices, "peak_memory_mb", lambda device: next(peaks))
    run_config = {**TINY_RUN_CONFIG, "strategy.name": "flora"}
    if node == "private":
        run_config["fedlora.set"] += " privacy.clip_norm=1.0 privacy.noise_multiplier=0.1"
    cfg = example.task.fedlora_config(run_config)
    handle = fedloras_node if node == "fedlora" else example_node(example)
    run_config = run_config if node != "fedlora" else None  # type: ignore[assignment]
    fed = FedLoRA(cfg)
    grid = LocalGrid(cfg, handle=handle, run_config=run_config)

    fed.start(grid, ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    assert len(opened) >= 6  # a window per client per round (and the server's own)
    if node == "private":
        assert fed.peak_memory_mb == {}
        return
    assert sorted(fed.peak_memory_mb) == [c.cid for c in fed.clients]
    # the fake peaks grow, so each client's largest is its round-2 figure: three distinct ones
    assert len(set(fed.peak_memory_mb.values())) == 3
    assert min(fed.peak_memory_mb.values()) >= 100.0


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


# --- fedlora's methods in a Flower user's own ClientApp (fedlora.flower.client_side) -----------

EXAMPLE = Path(__file__).parent.parent / "examples" / "flowertune-fedlora"

# the tiny config (configs/tiny.toml) in the example's FlowerTune keys
TINY_RUN_CONFIG: dict[str, Any] = {
    "model.name": "tiny-llama",
    "train.seq-length": 64,
    "dataset.name": "chatterbot",
    "dataset.heldout": 16,
    "strategy.num-clients": 3,
    "model.lora.peft-lora-r": "8,4,2",
    "train.learning-rate": 3e-3,
    "train.max-steps": 3,
    "train.per-device-train-batch-size": 4,
    "fedlora.set": "model.dtype=float32 data.limit=200 train.fuse=false eval.batch_size=16",
    "num-server-rounds": 2,
    "seed": 0,
}


@pytest.fixture(scope="module")
def example() -> Any:
    """The example app's modules (``flowertune_fedlora``), imported from examples/."""
    import importlib
    import sys

    sys.path.insert(0, str(EXAMPLE))
    try:
        return SimpleNamespace(
            client=importlib.import_module("flowertune_fedlora.client_app"),
            task=importlib.import_module("flowertune_fedlora.task"),
        )
    finally:
        sys.path.remove(str(EXAMPLE))


def example_node(example: Any) -> Handler:
    """The example's ClientApp functions as a node's answer."""

    def handle(msg: Message, context: Context) -> RecordDict:
        kind = msg.metadata.message_type
        return getattr(example.client, kind)(msg, context).content  # type: ignore[no-any-return]

    return handle


def test_the_examples_run_config_is_the_tiny_config(example: Any) -> None:
    got = example.task.fedlora_config({**TINY_RUN_CONFIG, "strategy.name": "flexlora"})
    assert to_dict(got) == to_dict(tiny("flexlora"))
    with pytest.raises(ValueError, match=r"run config key 'train.lr' is not one of"):
        example.task.fedlora_config({**TINY_RUN_CONFIG, "train.lr": 0.1})
    got = example.task.fedlora_config({**TINY_RUN_CONFIG, "model.quantization": 8})
    assert got.clients.quantization == ["8bit"]
    with pytest.raises(ValueError, match=r"model.quantization must be 0, 4 or 8 \(bits\), got 3"):
        example.task.fedlora_config({**TINY_RUN_CONFIG, "model.quantization": 3})


@pytest.mark.parametrize("strategy", ["flora", "flexlora", "hafl-freeze"])
def test_a_users_clientapp_with_the_two_calls_runs_the_method_as_fedloras_engine(
    strategy: str, example: Any, tmp_path: Path
) -> None:
    run_config = {**TINY_RUN_CONFIG, "strategy.name": strategy}
    cfg = example.task.fedlora_config(run_config)
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    snapshots = []
    fed = FedLoRA(cfg, on_round=lambda record, snapshot: snapshots.append(snapshot))
    grid = LocalGrid(cfg, handle=example_node(example), run_config=run_config)

    fed.start(grid, ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    assert_same_run(fed, snapshots, tmp_path / "inprocess")
    # the ranks came from the run config, node k taking entry k of "8,4,2"
    assert [c.rank for c in fed.clients] == [8, 4, 2]
    fed.save_adapter(tmp_path / "adapter")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    inprocess = load_file(str(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(inprocess)
    for key, value in inprocess.items():
        torch.testing.assert_close(adapter[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_users_clientapp_on_a_quantized_base_runs_the_method_as_fedloras_engine(
    example: Any, tmp_path: Path
) -> None:
    """FlowerTune's model.quantization = 4 loads every node's base in 4 bits, one node's node
    config says 8: FLoRA's merged updates stay float32 beside the quantized weights, and the run
    equals the in-process engine with the same clients.quantization."""
    run_config = {**TINY_RUN_CONFIG, "strategy.name": "flora", "model.quantization": 4}
    cfg = example.task.fedlora_config(run_config)
    inprocess = dataclasses.replace(
        cfg, clients=dataclasses.replace(cfg.clients, quantization=["4bit", "4bit", "8bit"])
    )
    run_experiment(inprocess, tmp_path / "inprocess", progress=False)
    snapshots = []
    fed = FedLoRA(cfg, on_round=lambda record, snapshot: snapshots.append(snapshot))
    grid = LocalGrid(cfg, handle=example_node(example), run_config=run_config)
    grid.contexts[102].node_config["quantization"] = "8bit"

    fed.start(grid, ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    assert_same_run(fed, snapshots, tmp_path / "inprocess")
    assert [client_side.quantization(c, cfg) for c in grid.contexts.values()] == [
        "4bit",
        "4bit",
        "8bit",
    ]
    model = example.task.get_model(cfg, "4bit").model
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_a_clientapp_with_its_own_trainer_trains_every_round(example: Any) -> None:
    """transformers' Trainer between the two calls: every client delivers every round, and the
    global model's held-out loss falls from the base model's."""
    run_config = {**TINY_RUN_CONFIG, "strategy.name": "flexlora", "train.trainer": "hf"}
    cfg = example.task.fedlora_config(run_config)
    fed = FedLoRA(cfg)
    grid = LocalGrid(cfg, handle=example_node(example), run_config=run_config)

    fed.start(grid, ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    assert [len(r.clients) for r in fed.records[1:]] == [3, 3]
    assert all(not r.failed for r in fed.records)
    assert fed.records[-1].metrics["loss"] < fed.records[0].metrics["loss"]


@pytest.mark.parametrize("strategy", ["flora", "flexlora"])
def test_flwr_run_of_the_flowertune_example_equals_the_inprocess_engine(
    strategy: str, example: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flwr run examples/flowertune-fedlora`` on Flower's simulation engine (a SuperLink in
    simulation mode, three SuperNodes in Ray), as its README says, with the tiny model."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Flower must not write there
    out = tmp_path / "out"
    run_config = {**TINY_RUN_CONFIG, "strategy.name": strategy, "save-path": str(out)}
    run_experiment(example.task.fedlora_config(run_config), tmp_path / "inprocess", progress=False)
    home = tmp_path / "flower"
    with Processes(home, home / "logs") as procs:
        address = procs.superlink(free_port(), simulation=True)
        write_connection(home, address)
        with (tmp_path / "run.log").open("w") as log:
            status = flwr_run(
                EXAMPLE,
                home,
                federation_config="num-supernodes=3",
                log=log,
                timeout_s=600,
                run_config=node_config_arg(run_config),
            )
    assert status == "finished:completed", (tmp_path / "run.log").read_text()[-3000:]

    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    rounds = json.loads((out / "metrics.json").read_text())
    losses = [row["eval_loss"] for row in _rows(tmp_path / "inprocess")]
    assert [r["eval_loss"] for r in rounds] == pytest.approx(losses, rel=1e-5)


def test_flowers_dp_wrapper_is_refused_with_why_and_what_instead() -> None:
    """Flower's client-side DP wrapper noises arrays FedLoRA does not train from: refused
    before any node trains, never a run that looks private and is not."""
    cfg = tiny("flora")
    grid = LocalGrid(cfg)
    dp = DifferentialPrivacyClientSideFixedClipping(
        FedLoRA(cfg), noise_multiplier=1.0, clipping_norm=0.5, num_sampled_clients=3
    )

    refused = r"(?s)wrappers cannot wrap FedLoRA.*\[privacy\] clip_norm"
    with pytest.raises(ConfigError, match=refused):
        dp.start(grid, ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    assert not [m for m in grid.sent if m.metadata.message_type == "train"]


def test_a_wrapper_that_changes_the_global_adapter_between_rounds_is_refused() -> None:
    """Anything that noises or clips the arrays aggregate_train returned (Flower passes them
    back to configure_train) is refused at the next round."""
    cfg = tiny("flora")
    fed = FedLoRA(cfg)
    grid = LocalGrid(cfg)
    fed.configure_train(1, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    replies = grid.send_and_receive(list(fed.messages(fed._tasks)), 60)
    arrays, _ = fed.aggregate_train(1, replies)
    assert arrays is not None
    tensors = arrays.to_torch_state_dict()
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3  # a wrapper's noise

    with pytest.raises(ConfigError, match=r"differs from the one its aggregate_train returned"):
        fed.configure_train(2, ArrayRecord(tensors), ConfigRecord(), grid)  # type: ignore[arg-type]
    fed.configure_train(2, arrays, ConfigRecord(), grid)  # type: ignore[arg-type]  # unchanged: fine


def test_flowers_server_side_dp_wrapper_fails_before_any_aggregation() -> None:
    """The server-side wrapper clips each reply against the one ArrayRecord it sent, which a
    reply at its client's own rank does not match: Flower's own clipping fails in round 1,
    before FedLoRA aggregates anything (docs/flower.md)."""
    cfg = tiny("flora")
    fed = FedLoRA(cfg)
    dp = DifferentialPrivacyServerSideFixedClipping(
        fed, noise_multiplier=1.0, clipping_norm=0.5, num_sampled_clients=3
    )

    with pytest.raises(ValueError, match="zip"):
        dp.start(LocalGrid(cfg), ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    assert [r.round for r in fed.records] == [0]


def test_fedloras_own_privacy_in_a_users_clientapp_equals_the_inprocess_engine(
    example: Any, tmp_path: Path
) -> None:
    """What fedlora offers instead of the wrappers: each client clips and noises its own update
    before it leaves (a seeded noise here, so both engines draw the same)."""
    private = "privacy.clip_norm=0.05 privacy.noise_multiplier=0.5 privacy.noise_seed=7"
    run_config = {**TINY_RUN_CONFIG, "strategy.name": "flexlora"}
    run_config["fedlora.set"] += " " + private
    cfg = example.task.fedlora_config(run_config)
    assert cfg.privacy.clip_norm == 0.05
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    snapshots = []
    fed = FedLoRA(cfg, on_round=lambda record, snapshot: snapshots.append(snapshot))
    grid = LocalGrid(cfg, handle=example_node(example), run_config=run_config)

    fed.start(grid, ArrayRecord(), num_rounds=cfg.rounds)  # type: ignore[arg-type]

    assert_same_run(fed, snapshots, tmp_path / "inprocess")
    # a private client sends neither its loss nor its example count
    assert fed.records[1].train_loss is None


def _context(node: dict[str, Any], run: dict[str, Any] | None = None) -> Context:
    return Context(1, 100, node, RecordDict(), run or {})  # type: ignore[arg-type]


def test_a_nodes_rank_comes_from_its_node_config_or_the_run_configs_list() -> None:
    run = {"model.lora.peft-lora-r": "16,8,4"}
    assert [client_side.node_rank(_context({"partition-id": k}, run)) for k in range(5)] == [
        16, 8, 4, 16, 8,
    ]  # fmt: skip
    one = {"model.lora.peft-lora-r": 32}
    assert client_side.node_rank(_context({"partition-id": 1}, one)) == 32
    assert client_side.node_rank(_context({"partition-id": 1, "rank": 2}, run)) == 2
    for node, config, error in [
        ({"partition-id": 0}, {}, "this node has no rank"),
        ({"partition-id": 0}, {"model.lora.peft-lora-r": "16,x"}, "comma-separated ints"),
        ({"partition-id": 0, "rank": 0}, run, "node config rank must hold ranks >= 1"),
        ({"rank": 4}, {}, None),
    ]:
        if error is None:
            with pytest.raises(ConfigError, match="partition-id must be an int"):
                client_side.node_index(_context(node, config))
            continue
        with pytest.raises(ConfigError, match=error):
            client_side.node_rank(_context(node, config))


def test_a_message_from_another_strategy_is_refused_by_name() -> None:
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), 100, "query")
    with pytest.raises(UpdateError, match=r"query message has no record 'fedlora'.*FedLoRA\?"):
        client_side.identity(msg, _context({"partition-id": 0, "rank": 4}))


def test_a_plan_meant_for_another_client_is_refused(example: Any) -> None:
    cfg = example.task.fedlora_config({**TINY_RUN_CONFIG, "strategy.name": "flexlora"})
    fed = FedLoRA(cfg)
    grid = LocalGrid(cfg)
    msg = next(iter(fed.configure_train(1, ArrayRecord(), ConfigRecord(), grid)))  # type: ignore[arg-type]
    wrong = _context({"partition-id": 2, "num-partitions": 3}, dict(TINY_RUN_CONFIG))
    model = example.task.get_model(cfg).model
    with pytest.raises(UpdateError, match=r"the plan is client 0's, this node is partition-id 2"):
        client_side.receive(msg, wrong, model)


@pytest.mark.parametrize("alpha", [0, -2.0, True, "16", None], ids=repr)
def test_a_plan_whose_alpha_is_not_a_positive_number_is_refused(example: Any, alpha: Any) -> None:
    cfg = example.task.fedlora_config({**TINY_RUN_CONFIG, "strategy.name": "flexlora"})
    grid = LocalGrid(cfg)
    msg = next(iter(FedLoRA(cfg).configure_train(1, ArrayRecord(), ConfigRecord(), grid)))  # type: ignore[arg-type]
    plan = msg.content.config_records["plan"]
    if alpha is None:
        del plan["alpha"]
    else:
        plan["alpha"] = alpha
    context = _context({"partition-id": 0, "num-partitions": 3}, dict(TINY_RUN_CONFIG))
    model = example.task.get_model(cfg).model
    with pytest.raises(UpdateError, match=r"train message: plan: alpha must be a number > 0"):
        client_side.receive(msg, context, model)


def test_a_peft_model_of_the_users_own_is_unwrapped_and_given_the_runs_adapter(
    example: Any,
) -> None:
    """FlowerTune's get_model returns a PEFT model at the app's own rank: receive removes it
    and attaches the run's adapter at this node's rank; reply gives the plain base back."""
    from peft import LoraConfig, get_peft_model

    from fedlora import adapters

    cfg = example.task.fedlora_config({**TINY_RUN_CONFIG, "strategy.name": "flexlora"})
    fed = FedLoRA(cfg)
    msg = next(iter(fed.configure_train(1, ArrayRecord(), ConfigRecord(), LocalGrid(cfg))))  # type: ignore[arg-type]
    base = load_configured(cfg.model, cfg.seed).model  # not the example's cached one
    users = get_peft_model(base, LoraConfig(r=32, target_modules=["q_proj"]))
    context = _context({"partition-id": 0, "num-partitions": 3}, dict(TINY_RUN_CONFIG))

    local = client_side.receive(msg, context, users)
    ranks = {f.rank for f in adapters.read_factors(local.model).values()}
    assert ranks == {8}  # client 0's rank in "8,4,2", not the app's 32
    reply = client_side.reply(msg, local, num_examples=5, loss=1.0)

    assert not any("lora_" in name for name, _ in base.named_modules())
    assert reply.content["result"]["num_examples"] == 5


def test_initial_arrays_that_would_be_ignored_are_refused() -> None:
    """FlowerTune passes its initial PEFT state as initial_arrays; a fedlora method starts from
    the base model, so FedLoRA says so rather than ignore them."""
    cfg = tiny("flora")
    grid = LocalGrid(cfg)
    initial = ArrayRecord({"q_proj.lora_A": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match=r"initial_arrays \(1 arrays.*pass ArrayRecord\(\)"):
        FedLoRA(cfg).start(grid, initial, num_rounds=1)  # type: ignore[arg-type]
    assert not grid.sent

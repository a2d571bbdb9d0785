"""Where Flower's clients train: the simulation engine's client resources (GPUs per ClientApp),
a local deployment's node devices, a node config's ``device``, and the summary's
``client_devices``. The option tests are pure (no CUDA needed); the runs are on the CPU."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json

from fedlora import devices
from fedlora.config import RunConfig, load_config, to_dict
from fedlora.errors import ConfigError, UpdateError
from fedlora.experiment import run_experiment
from fedlora.flower import apps, launch
from fedlora.flower.launch import (
    deployment_devices,
    deployment_threads,
    node_config_arg,
    run_deployment,
    run_simulation,
    simulation_options,
)
from fedlora.flower.records import content_device, content_peak_memory, result_content
from fedlora.flower.strategy import result_of
from fedlora.lora import LoRAFactors
from fedlora.rounds import ClientInfo, Failure, LocalPlan, LocalResult, Task

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def tiny(*overrides: str) -> RunConfig:
    return load_config(TINY, list(overrides))


def on(cfg: RunConfig, device: str) -> RunConfig:
    """``cfg`` with ``model.device`` set without resolving it (a CUDA device on this CPU)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=device))


# --- the simulation engine's client resources -------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "cuda", "gpus"),
    [
        ([], 0, 0.0),  # no CUDA: Ray gives the ClientApps no GPU, they train on the CPU
        ([], 1, 1.0),  # one GPU, one client on it at a time
        ([], 4, 1.0),
        (["flower.clients_per_gpu=4"], 1, 0.25),
        (["flower.clients_per_gpu=4"], 0, 0.0),
        (["flower.client_gpus=0.5", "flower.clients_per_gpu=4"], 1, 0.5),  # explicit wins
        (["flower.client_gpus=0"], 2, 0.0),
        (["flower.client_gpus=2"], 2, 2.0),
    ],
)
def test_the_simulation_gives_each_client_its_gpus(
    overrides: list[str], cuda: int, gpus: float
) -> None:
    options = simulation_options(tiny(*overrides), 3, cuda, host_cpus=16)

    assert options == {
        "num-supernodes": 3,
        "client-resources-num-cpus": 2,
        "client-resources-num-gpus": gpus,
    }


def test_clients_of_a_cpu_model_get_no_gpu_by_default() -> None:
    assert simulation_options(tiny("model.device=cpu"), 3, 2, 16)["client-resources-num-gpus"] == 0
    assert simulation_options(on(tiny(), "cuda:1"), 3, 2, 16)["client-resources-num-gpus"] == 1.0


@pytest.mark.parametrize(
    ("overrides", "host", "cpus"),
    [([], 16, 2), ([], 1, 1), (["flower.client_cpus=3"], 16, 3), (["flower.client_cpus=4"], 1, 4)],
)
def test_the_simulation_gives_each_client_its_cores(
    overrides: list[str], host: int, cpus: int
) -> None:
    options = simulation_options(tiny(*overrides), 3, 0, host_cpus=host)

    assert options["client-resources-num-cpus"] == cpus


def test_the_default_cpu_options_are_what_flower_reads() -> None:
    """The text ``flwr run --federation-config`` gets, read by Flower's own parser into the
    simulation config its SuperLink runs with."""
    text = node_config_arg(simulation_options(tiny(), 3, 0, host_cpus=2))

    assert text == "num-supernodes=3 client-resources-num-cpus=2 client-resources-num-gpus=0.0"
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()}
    flower = simulation_config_from_json(parsed)
    assert flower.num_supernodes == 3 and flower.client_resources_num_cpus == 2
    assert flower.HasField("client_resources_num_gpus")
    assert flower.client_resources_num_gpus == 0.0
    shared = node_config_arg(simulation_options(tiny("flower.clients_per_gpu=4"), 3, 1, 2))
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([shared]).items()}
    assert simulation_config_from_json(parsed).client_resources_num_gpus == 0.25


@pytest.mark.parametrize(
    ("gpus", "cuda"), [("1", 0), ("0.25", 0), ("2", 1)], ids=["1of0", "quarter-of-0", "2of1"]
)
def test_more_gpus_per_client_than_the_machine_has_is_named(gpus: str, cuda: int) -> None:
    with pytest.raises(ConfigError, match=rf"flower\.client_gpus = {gpus} GPUs per client, but"):
        simulation_options(tiny(f"flower.client_gpus={gpus}"), 3, cuda, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["flower.client_gpus=-0.5"], r"flower\.client_gpus must be >= 0.*got -0\.5"),
        (["flower.client_gpus=1.5"], r"flower\.client_gpus must be .*whole number.*got 1\.5"),
        (["flower.clients_per_gpu=0"], r"flower\.clients_per_gpu must be >= 1, got 0"),
        (["flower.client_cpus=0"], r"flower\.client_cpus must be >= 1, got 0"),
        (["flower.client_cpus=1.5"], r"flower\.client_cpus: 1\.5 is not a valid int or none"),
    ],
)
def test_a_bad_client_resource_names_its_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_good_client_resources_load() -> None:
    cfg = tiny("flower.client_gpus=0.25", "flower.clients_per_gpu=2", "flower.client_cpus=1")

    assert (cfg.flower.client_gpus, cfg.flower.clients_per_gpu, cfg.flower.client_cpus) == (
        0.25,
        2,
        1,
    )
    assert tiny().flower.client_gpus is None and tiny().flower.client_cpus is None


# --- a local deployment's node devices and a node's device ------------------------------------


@pytest.mark.parametrize(
    ("device", "cuda", "want"),
    [
        ("auto", 0, ["cpu", "cpu", "cpu"]),
        ("auto", 1, ["cuda:0", "cuda:0", "cuda:0"]),
        ("auto", 2, ["cuda:0", "cuda:1", "cuda:0"]),
        ("cpu", 2, ["cpu", "cpu", "cpu"]),  # the run's explicit device is every node's
        ("cuda:1", 2, ["cuda:1", "cuda:1", "cuda:1"]),
    ],
)
def test_a_local_deployment_spreads_its_nodes_over_the_gpus(
    device: str, cuda: int, want: list[str]
) -> None:
    assert deployment_devices(on(tiny(), device), 3, cuda) == want


@pytest.mark.parametrize(("n", "cpus", "want"), [(3, 2, 1), (2, 16, 8), (3, 16, 5), (1, 1, 1)])
def test_a_local_deployment_shares_the_cores_among_its_nodes(n: int, cpus: int, want: int) -> None:
    assert deployment_threads(n, cpus) == want


def test_a_local_deployment_tells_each_node_its_threads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every SuperNode's node config carries the shared-out threads (or the ones asked for)."""
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(launch.Processes, "superlink", lambda self, port: "127.0.0.1:1")
    monkeypatch.setattr(
        launch.Processes,
        "supernode",
        lambda self, k, link, node, port: started.append(dict(node)),
    )
    monkeypatch.setattr(launch, "submit", lambda cfg, out, address, echo: {})

    launch.run_deployment(tiny(), tmp_path / "shared", echo=False)
    launch.run_deployment(tiny(), tmp_path / "asked", echo=False, threads=3)

    assert [node["threads"] for node in started] == [deployment_threads(3)] * 3 + [3] * 3
    assert [node["partition-id"] for node in started] == [0, 1, 2] * 2


def test_a_node_computes_with_its_node_config_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(settings: str, seed: int, quantization: str = "none") -> Any:
        raise Loaded

    monkeypatch.setattr(apps, "_loaded", load)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    try:
        with pytest.raises(Loaded):
            apps.node_party(tiny(), {"partition-id": 0, "trust-server": True, "threads": want})
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Loaded):  # no threads: torch's own
        apps.node_party(tiny(), {"partition-id": 0, "trust-server": True})
    assert torch.get_num_threads() == before
    joined = {"fedlora-config": json.dumps(to_dict(tiny())), "out": "unused"}
    for bad in (0, True, "2", 1.5):
        node = {"partition-id": 0, "trust-server": True, "threads": bad}
        with pytest.raises(ConfigError, match=r"node config threads must be an int >= 1, got"):
            apps.node_party(tiny(), node)
        with pytest.raises(ConfigError, match=r"node config threads must be an int >= 1, got"):
            apps.node_query(Context(1, 1, node, RecordDict(), joined))  # type: ignore[arg-type]


def test_round_robin_names_each_gpu_in_turn() -> None:
    assert devices.round_robin(5, 3) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert devices.round_robin(2, 0) == ["cpu", "cpu"]
    assert devices.names_host("cpu") and not devices.names_host("auto")
    assert not devices.names_host("cuda:0")


def test_a_node_config_device_is_the_nodes_device() -> None:
    cfg = tiny()  # model.device = auto

    assert apps.node_device(cfg, {"partition-id": 0}) == "auto"
    assert apps.node_device(cfg, {"partition-id": 0, "device": "cuda:1"}) == "cuda:1"
    assert apps.node_device(on(cfg, "cpu"), {"partition-id": 0, "device": "cuda:2"}) == "cuda:2"
    with pytest.raises(ConfigError, match="node config device must be a device name"):
        apps.node_device(cfg, {"partition-id": 0, "device": 1})


class Loaded(Exception):
    """Stops ``node_party`` where it loads the model."""


def test_a_node_loads_its_model_on_its_node_config_device(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[dict[str, Any]] = []

    def load(settings: str, seed: int, quantization: str = "none") -> Any:
        asked.append(json.loads(settings))
        raise Loaded

    monkeypatch.setattr(apps, "_loaded", load)
    cfg = tiny()
    for node in (
        {"partition-id": 1, "device": "cuda:3", "trust-server": True},
        {"partition-id": 1, "trust-server": True},
    ):
        with pytest.raises(Loaded):
            apps.node_party(cfg, node)

    assert [a["device"] for a in asked] == ["cuda:3", "auto"]
    assert asked[0] | {"device": "auto"} == asked[1]  # nothing else of [model] changes


# --- the device a client reports --------------------------------------------------------------


def _result() -> LocalResult:
    return LocalResult({"m": LoRAFactors(A=torch.ones(1, 3), B=torch.ones(2, 1))}, 0.5, None, {}, 3)


def test_a_reply_says_the_device_its_client_trained_on() -> None:
    assert content_device(result_content(_result(), device="cuda:1"), "c") == "cuda:1"
    assert content_device(result_content(_result()), "c") is None
    bad = result_content(_result())
    bad.config_records["result"]["device"] = 3
    with pytest.raises(UpdateError, match="reply of client 'c': device must be a string"):
        content_device(bad, "c")


def test_a_reply_says_the_peak_memory_of_its_training() -> None:
    assert content_peak_memory(result_content(_result(), peak_memory_mb=512.5), "c") == 512.5
    assert content_peak_memory(result_content(_result(), device="cpu"), "c") is None
    for bad in (-1.0, float("nan"), float("inf"), "9", True):
        content = result_content(_result())
        content.config_records["result"]["peak_memory_mb"] = bad
        with pytest.raises(UpdateError, match="reply of client 'c': peak_memory_mb must be a"):
            content_peak_memory(content, "c")


def test_the_server_collects_the_devices_of_accepted_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    odd = result_content(_result(), device="cuda:7", peak_memory_mb=99.0)
    odd.config_records["result"]["device"] = 7  # rejected: its device and peak are not counted
    replies: list[RecordDict | Failure] = [
        result_content(_result(), device="cuda:1", peak_memory_mb=300.0),
        result_content(_result(), device="cpu"),
        result_content(_result()),  # an older node says nothing
        odd,
        RecordDict({"result": ConfigRecord({"loss": 1.0, "device": "cuda:9"})}),  # malformed
    ]
    tasks = [Task(ClientInfo(f"c{k}", k, 4, 8.0), 1, LocalPlan(4), 0, [], 0) for k in range(5)]
    seen: set[str] = set()
    peaks = {"c0": 400.0}  # an earlier round's larger peak stays

    shapes = {"m": (2, 3)}
    out = [result_of(t, r, shapes, seen, peaks) for t, r in zip(tasks, replies, strict=True)]

    assert [isinstance(r, Failure) for r in out] == [False, False, False, True, True]
    assert seen == {"cpu", "cuda:1"}
    assert peaks == {"c0": 400.0}
    result_of(tasks[0], result_content(_result(), peak_memory_mb=700.0), shapes, seen, peaks)
    assert peaks == {"c0": 700.0}


# --- runs on the CPU --------------------------------------------------------------------------


def test_inprocess_clients_train_on_the_servers_device(tmp_path: Path) -> None:
    summary = run_experiment(tiny("rounds=1", "train.steps=1"), tmp_path / "run", progress=False)

    want = ["cpu"] if devices.cuda_count() == 0 else ["cuda:0"]  # model.device = auto
    assert summary["client_devices"] == want
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["client_devices"] == want


def test_a_cpu_simulation_gives_clients_no_gpu_and_reports_where_they_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    passed: list[str | None] = []
    flwr_run = launch.flwr_run

    def spy(app: Path, home: Path, **kwargs: Any) -> str:
        passed.append(kwargs.get("federation_config"))
        return flwr_run(app, home, **kwargs)

    monkeypatch.setattr(launch, "flwr_run", spy)

    summary = run_simulation(tiny("rounds=1", "train.steps=1"), tmp_path / "run", echo=False)

    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["client_devices"] == summary["client_devices"]
    if devices.cuda_count() == 0:
        cpus = min(2, os.cpu_count() or 1)
        assert passed == [
            f"num-supernodes=3 client-resources-num-cpus={cpus} client-resources-num-gpus=0.0"
        ]
        assert saved["client_devices"] == ["cpu"]
        assert saved["client_peak_memory_mb"] == {}  # no allocator statistics off CUDA
    else:  # each ClientApp sees only the GPU Ray gave it
        assert saved["client_devices"] == ["cuda:0"]
        assert len(saved["client_peak_memory_mb"]) == 3
        assert all(mb > 0 for mb in saved["client_peak_memory_mb"].values())


def test_a_local_deployment_tells_each_node_its_device(tmp_path: Path) -> None:
    summary = run_deployment(tiny("rounds=1", "train.steps=1"), tmp_path / "run", echo=False)

    cuda = devices.cuda_count()
    assert summary["client_devices"] == sorted(set(devices.round_robin(3, cuda)))
    if cuda == 0:
        assert summary["client_devices"] == ["cpu"]

"""The Flower apps' error paths, without Flower processes: a node's config, the server's node
query, its wait for nodes, a rejected reply and a gap in a node's merged updates; and the
launcher stopping every process of a run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedlora.config import RunConfig, load_config
from fedlora.errors import ConfigError, FedloraError, UpdateError
from fedlora.flower import apps, strategy
from fedlora.flower.launch import Processes, flower_env, run_processes
from fedlora.flower.records import factors_record
from fedlora.lora import LoRAFactors
from fedlora.rounds import ClientInfo, Failure, LocalPlan, Task

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def tiny() -> RunConfig:
    return load_config(TINY)


# --- a node's config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "the node config has no partition-id"),
        ({"partition-id": 3}, r"partition-id must be an int in 0 … 2, got 3"),
        ({"partition-id": True}, r"partition-id must be an int in 0 … 2, got True"),
        ({"partition-id": "1"}, r"partition-id must be an int in 0 … 2, got '1'"),
        ({"partition-id": 0, "rank": 0}, "rank must be an int >= 1, got 0"),
        ({"partition-id": 0, "rank": "8"}, "rank must be an int >= 1, got '8'"),
    ],
)
def test_a_bad_node_config_is_named(node_config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apps.node_client(tiny(), node_config)


def test_a_node_takes_its_rank_from_the_config_or_its_own(tmp_path: Path) -> None:
    cfg = tiny()  # ranks [8, 4, 2], α = 2r

    default, kind = apps.node_client(cfg, {"partition-id": 1, "trust-server": True})
    own, _ = apps.node_client(
        cfg, {"partition-id": 1, "rank": 6, "alpha": 3.0, "trust-server": True}
    )

    assert (default.cid, default.index, default.rank, default.alpha) == ("client-0001", 1, 4, 8.0)
    assert (own.rank, own.alpha) == (6, 3.0) and own.examples == default.examples
    assert kind == "instruction" and default.examples


def test_a_node_with_its_own_data_file_uses_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    client, kind = apps.node_client(tiny(), {"partition-id": 2, "data": str(path)})

    assert [e.prompt for e in client.examples] == [f"q{i}" for i in range(5)]
    assert kind == "instruction" and client.index == 2


def test_a_node_whose_data_file_is_missing_says_which(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.jsonl"):
        apps.node_client(tiny(), {"partition-id": 0, "data": str(tmp_path / "nope.jsonl")})


# --- the server's questions to the nodes ------------------------------------------------------


class Grid:
    """A Flower grid with fixed node ids (only what the code under test asks of it)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _identity(index: int, cid: str | None = None) -> RecordDict:
    return RecordDict(
        {
            "client": ConfigRecord(
                {
                    "cid": cid or f"client-{index:04d}",
                    "index": index,
                    "rank": 4,
                    "alpha": 8.0,
                    "examples": 10,
                }
            )
        }
    )


def _replying(monkeypatch: pytest.MonkeyPatch, replies: list[RecordDict | Failure]) -> None:
    """The nodes' replies, in order; messages are built as in a run (which sets the run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(strategy, "send", lambda grid, messages, timeout, names: replies)


def test_two_nodes_with_the_same_partition_id_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _replying(monkeypatch, [_identity(0), _identity(1), _identity(1)])

    with pytest.raises(ConfigError, match="nodes 12 and 13 both say partition-id 1"):
        strategy.identify(Grid([11, 12, 13]), [11, 12, 13], tiny(), 1.0)  # type: ignore[arg-type]


def test_a_missing_partition_id_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _replying(monkeypatch, [_identity(0), _identity(2), _identity(4)])
    cfg = load_config(TINY, ["clients.num_clients=5", "clients.ranks=[4]"])

    with pytest.raises(ConfigError, match="no node has partition-id 1"):
        strategy.identify(Grid([1, 2, 3]), [1, 2, 3], cfg, 1.0)  # type: ignore[arg-type]


def test_a_node_that_does_not_answer_the_query_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _replying(monkeypatch, [_identity(0), Failure("no reply within 1 s"), _identity(2)])

    with pytest.raises(FedloraError, match="node 8 did not say which client it is: no reply"):
        strategy.identify(Grid([7, 8, 9]), [7, 8, 9], tiny(), 1.0)  # type: ignore[arg-type]


def test_the_identified_clients_come_in_index_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _replying(monkeypatch, [_identity(2), _identity(0), _identity(1)])

    clients, node_of, examples, claims = strategy.identify(Grid([5, 6, 7]), [5, 6, 7], tiny(), 1.0)  # type: ignore[arg-type]

    assert [c.index for c in clients] == [0, 1, 2]
    assert node_of == {"client-0000": 6, "client-0001": 7, "client-0002": 5}
    assert examples == dict.fromkeys(node_of, 10) and claims == {}


def test_a_node_cannot_take_another_slot_by_the_name_it_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _replying(monkeypatch, [_identity(0), _identity(1, cid="client-0000"), _identity(2)])

    clients, node_of, _, claims = strategy.identify(Grid([5, 6, 7]), [5, 6, 7], tiny(), 1.0)  # type: ignore[arg-type]

    assert [c.cid for c in clients] == ["client-0000", "client-0001", "client-0002"]
    assert node_of == {"client-0000": 5, "client-0001": 6, "client-0002": 7}
    assert claims == {
        "client-0001": "node 6 called itself 'client-0000'; it is client-0001, the slot of its "
        "partition-id 1"
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("index", 99, "node 6 says partition-id 99; expected 0 … 2"),
        ("index", "1", "node 6: index must be an int >= 0"),
        ("rank", 0, "node 6: rank must be an int >= 1"),
        ("alpha", "8", "node 6: alpha must be a number > 0"),
        ("examples", 2**40 + 0.5, "node 6: examples must be an int >= 1"),
    ],
)
def test_a_malformed_identity_is_named(
    monkeypatch: pytest.MonkeyPatch, field: str, value: object, message: str
) -> None:
    bad = _identity(1)
    record = dict(bad.config_records["client"])
    record[field] = value  # type: ignore[assignment]
    bad["client"] = ConfigRecord(record)  # type: ignore[arg-type]
    _replying(monkeypatch, [_identity(0), bad, _identity(2)])

    with pytest.raises(FedloraError, match=message):
        strategy.identify(Grid([5, 6, 7]), [5, 6, 7], tiny(), 1.0)  # type: ignore[arg-type]


def test_waiting_for_too_few_nodes_times_out_with_the_count() -> None:
    with pytest.raises(FedloraError, match=r"only 2 of clients\.num_clients = 3 nodes connected"):
        strategy.wait_for_nodes(Grid([1, 2]), 3, 0.0)  # type: ignore[arg-type]
    assert strategy.wait_for_nodes(Grid([3, 1, 2]), 3, 0.0) == [1, 2, 3]  # type: ignore[arg-type]


def test_a_malformed_reply_is_a_failed_client_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = RecordDict({"result": ConfigRecord({"loss": 1.0})})  # no factors, no examples
    replies: list[RecordDict | Failure] = [bad, Failure("its node failed: boom")]
    tasks = [
        Task(ClientInfo(f"client-000{k}", k, 4, 8.0), 1, LocalPlan(4), 0, [], 0) for k in (0, 1)
    ]

    shapes = {"layers.0.q_proj": (12, 10)}
    out = [strategy.result_of(t, r, shapes) for t, r in zip(tasks, replies, strict=True)]

    assert isinstance(out[0], Failure) and out[0].reason.startswith("rejected reply: ")
    assert isinstance(out[1], Failure) and out[1].reason == "its node failed: boom"


# --- a node's merged updates ------------------------------------------------------------------


def _delta() -> dict[str, LoRAFactors]:
    return {"m": LoRAFactors(A=torch.ones(1, 3), B=torch.ones(2, 1))}


def test_a_gap_in_a_nodes_merged_updates_is_an_error() -> None:
    state = RecordDict({"base.0": factors_record(_delta()), "base.2": factors_record(_delta())})

    with pytest.raises(UpdateError, match=r"holds merged updates \[0, 2\], expected 0 … 1"):
        apps.received_base(SimpleNamespace(state=state))  # type: ignore[arg-type]


def test_a_nodes_merged_updates_come_back_in_order() -> None:
    first, second = _delta(), {"m": torch.full((2, 3), 2.0)}
    state = RecordDict({"base.1": factors_record(second), "base.0": factors_record(first)})

    got = apps.received_base(SimpleNamespace(state=state))  # type: ignore[arg-type]

    assert isinstance(got[0]["m"], LoRAFactors) and torch.equal(got[1]["m"], second["m"])  # type: ignore[arg-type]


# --- the launcher stops every process of a run ------------------------------------------------


def test_stopping_the_processes_also_stops_a_run_process_whose_parent_died(
    tmp_path: Path,
) -> None:
    """A stand-in SuperLink starts a "run" process in a session of its own (as Flower's SuperExec
    starts the simulation or ServerApp process) and dies on its own; ``Processes.stop`` still
    stops the orphan, found by its ``FLWR_HOME``, and leaves another run's process alone."""
    home, other = tmp_path / "run" / "flower", tmp_path / "other" / "flower"
    pid_file = tmp_path / "orphan.pid"
    spawn = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
        "start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], env=flower_env(other)
    )
    try:
        with Processes(home, home / "logs") as procs:
            link = procs.start("superlink", [sys.executable, "-c", spawn])
            assert link.wait(timeout=60) == 0  # the "SuperLink" is gone, its child is not
            deadline = time.monotonic() + 60
            while not pid_file.exists() or not pid_file.read_text():
                assert time.monotonic() < deadline, "the orphan never started"
                time.sleep(0.05)
            orphan = psutil.Process(int(pid_file.read_text()))
            assert orphan.ppid() != link.pid
            assert [p.pid for p in run_processes(home)] == [orphan.pid]
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert run_processes(home) == []
        assert bystander.poll() is None, "another run's process was stopped"
    finally:
        for proc in run_processes(home):  # only if the test failed
            proc.kill()
        bystander.kill()
        bystander.wait()


# --- a node's model keeper ----------------------------------------------------------------------


def _keeper_pid(where: Path) -> int:
    for line in (where / "log").read_text().splitlines():
        if line.startswith("keeper ") and " listening" in line:
            return int(line.split()[1])
    raise AssertionError(f"no keeper in {where / 'log'}")


def test_a_keeper_answers_as_the_node_would_refuses_a_wrong_key_and_stops_with_its_supernode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keep-model=true``: the ClientApp hands its message to the node's keeper, started on the
    first message; the reply equals the node's own; a second message reuses the keeper; a
    connection with another key is refused; a failing message names its error; when the
    SuperNode (a stand-in process here) is gone, the keeper stops."""
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    from fedlora.config import to_dict
    from fedlora.flower import node

    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    monkeypatch.setattr(node.os, "getppid", lambda: supernode.pid)
    run_id = int.from_bytes(os.urandom(4), "big")
    run_config = {"fedlora-config": json.dumps(to_dict(tiny())), "out": str(tmp_path)}

    def context(keep: bool) -> Context:
        node_config = {"partition-id": 1, "keep-model": keep, "trust-server": True}
        return Context(run_id, 7, node_config, RecordDict(), run_config)  # type: ignore[arg-type]

    where = node.folder(run_id, supernode.pid)
    try:
        got = node.relay("query", RecordDict(), context(True))
        want = apps.node_query(context(False))
        assert dict(got["client"]) == dict(want["client"]) and want["client"]["index"] == 1
        keeper = psutil.Process(_keeper_pid(where))
        assert os.getsid(keeper.pid) == keeper.pid  # in a session of its own: outlives the app

        with pytest.raises(AuthenticationError):
            Client(str(where / "socket"), family="AF_UNIX", authkey=b"not the key")
        for garbage in ([b"not json"], [b'{"kind": "query"}', b"\xff" * 64]):
            key = (where / "key").read_bytes()
            with Client(str(where / "socket"), family="AF_UNIX", authkey=key) as conn:
                for part in garbage:
                    conn.send_bytes(part)
                assert json.loads(conn.recv_bytes()) == {"error": "malformed request"}
        with pytest.raises(FedloraError, match=r"^the node's model keeper failed: \w+Error: "):
            node.relay("train", RecordDict(), context(True))  # no plan in it
        again = node.relay("query", RecordDict(), context(True))
        assert dict(again["client"]) == dict(want["client"])
        assert _keeper_pid(where) == keeper.pid  # the same keeper answered all, refused garbage

        supernode.kill()
        supernode.wait()
        keeper.wait(timeout=30)  # raises if it is still running
        assert not where.exists()  # socket, key and lock gone with their folder
        assert "keeper stops: SuperNode gone" in node.stopped_log(where).read_text()
    finally:
        supernode.kill()
        with contextlib.suppress(psutil.Error, NameError):
            keeper.kill()
        shutil.rmtree(where, ignore_errors=True)
        node.stopped_log(where).unlink(missing_ok=True)


def test_a_keeper_drops_a_connection_that_stays_silent_and_answers_the_next(
    tmp_path: Path,
) -> None:
    """The keeper answers one connection at a time: one that connects and never authenticates
    must not hold it (``--handshake-s``, 30 s by default, 1 s here)."""
    import socket
    from multiprocessing.connection import Client

    from fedlora.flower.private import private_folder, write_private

    where = private_folder(tmp_path / "keeper")
    key = os.urandom(32)
    write_private(where / "key", key)
    argv = [sys.executable, "-m", "fedlora.flower.node", str(where), "--parent", str(os.getpid())]
    log = (tmp_path / "keeper.log").open("w")
    keeper = subprocess.Popen(
        [*argv, "--idle-s", "60", "--handshake-s", "1"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not (where / "socket").exists():
            assert time.monotonic() < deadline and keeper.poll() is None
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as silent:
            silent.connect(str(where / "socket"))  # and says nothing
            with Client(str(where / "socket"), family="AF_UNIX", authkey=key) as conn:
                conn.send_bytes(b"not json")
                assert conn.poll(20), "the keeper is still held by the silent connection"
                assert json.loads(conn.recv_bytes()) == {"error": "malformed request"}
    finally:
        keeper.kill()
        keeper.wait()
        log.close()
    assert (
        "refused a connection: _Late: nothing within 1 s" in (tmp_path / "keeper.log").read_text()
    )


def test_the_clientapp_imports_no_torch_until_it_does_the_work_itself() -> None:
    """A ClientApp process that hands its messages to a keeper pays for Flower only: the module
    Flower loads (``fedlora.flower.client``) imports none of torch, transformers or PEFT."""
    code = (
        "import sys, fedlora.flower.client; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- what a node keeps for itself ---------------------------------------------------------


def test_a_node_refuses_the_servers_data_unless_it_trusts_the_server() -> None:
    with pytest.raises(ConfigError, match=r"names no data of its own .* trust-server=true"):
        apps.node_client(tiny(), {"partition-id": 1})
    trusted, _ = apps.node_client(tiny(), {"partition-id": 1, "trust-server": True})
    simulated, _ = apps.node_client(tiny(), {"partition-id": 1, "num-partitions": 3})
    assert trusted.examples == simulated.examples and trusted.examples


def test_a_node_keeps_its_own_privacy_floor_and_refuses_a_noise_seed() -> None:
    server = load_config(TINY, ["privacy.clip_norm=0", "privacy.noise_multiplier=0"])
    own = apps.node_view(server, {"partition-id": 0, "dp-clip-norm": 0.5,
                                  "dp-noise-multiplier": 1.2})  # fmt: skip
    assert (own.privacy.clip_norm, own.privacy.noise_multiplier) == (0.5, 1.2)
    louder = load_config(TINY, ["privacy.clip_norm=1", "privacy.noise_multiplier=2"])
    kept = apps.node_view(louder, {"partition-id": 0, "dp-noise-multiplier": 1.2})
    assert (kept.privacy.clip_norm, kept.privacy.noise_multiplier) == (1.0, 2.0)  # never lower
    seeded = load_config(TINY, ["privacy.clip_norm=1", "privacy.noise_multiplier=1",
                                "privacy.noise_seed=3"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"privacy\.noise_seed, which would let it subtract"):
        apps.node_view(seeded, {"partition-id": 0})
    assert apps.node_view(seeded, {"partition-id": 0, "trust-server": True}) is seeded
    with pytest.raises(ConfigError, match="dp-noise-multiplier must be a number >= 0"):
        apps.node_view(server, {"partition-id": 0, "dp-noise-multiplier": "1"})


def test_a_private_node_does_not_tell_its_example_count(tmp_path: Path) -> None:
    from fedlora.config import to_dict

    data = tmp_path / "own.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(5)))
    run_config = {"fedlora-config": json.dumps(to_dict(tiny())), "out": str(tmp_path)}

    def query(node_config: dict[str, object]) -> ConfigRecord:
        context = Context(1, 7, node_config, RecordDict(), run_config)  # type: ignore[arg-type]
        return apps.node_query(context).config_records["client"]

    assert query({"partition-id": 0, "data": str(data)})["examples"] == 5
    private = query({"partition-id": 0, "data": str(data), "dp-clip-norm": 0.5})
    assert "examples" not in private and private["index"] == 0


def test_a_node_tells_a_server_it_does_not_trust_what_failed_not_its_details(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlora.config import to_dict
    from fedlora.flower import client

    secret = tmp_path / "SECRET-patients.jsonl"
    secret.write_text('{"prompt": "q", "diagnosis": "x"}\n')  # no response column: an error
    run_config = {"fedlora-config": json.dumps(to_dict(tiny())), "out": str(tmp_path)}

    class NoContent:
        def has_content(self) -> bool:
            return False

    def reply(node_config: dict[str, object]) -> None:
        context = Context(1, 7, node_config, RecordDict(), run_config)  # type: ignore[arg-type]
        client._reply("query", NoContent(), context)  # type: ignore[arg-type]

    with pytest.raises(FedloraError) as err:
        reply({"partition-id": 0, "data": str(secret)})
    assert str(err.value) == "the node's query failed (ConfigError); the node's own log says why"
    assert "SECRET" in capsys.readouterr().err  # the details stay in the node's own log
    with pytest.raises(ConfigError, match="SECRET-patients"):  # a trusted server sees them
        reply({"partition-id": 0, "data": str(secret), "trust-server": True})


def test_local_superlinks_listen_on_loopback_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.flower import launch

    started: list[list[str]] = []
    monkeypatch.setattr(Processes, "start", lambda self, name, argv: started.append(list(argv)))
    monkeypatch.setattr(launch, "wait_healthy", lambda *args: None)
    procs = Processes(tmp_path, tmp_path / "logs")

    for simulation in (True, False):
        address = procs.superlink(9999, simulation=simulation)
        assert address == "127.0.0.1:9999"
    for argv in started:
        assert argv[argv.index("--host") + 1] == "127.0.0.1"

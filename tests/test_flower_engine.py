"""fedlora on Flower: the simulation engine and a real deployment (a SuperLink and three
SuperNodes as separate processes, insecure and with TLS and node authentication) give the same
global adapter as the in-process runner, on the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fedlora.cli import main
from fedlora.config import RunConfig, load_config
from fedlora.experiment import run_experiment
from fedlora.flower.certs import make_certificates, make_node_key
from fedlora.flower.launch import (
    Processes,
    flower_env,
    free_ports,
    run_simulation,
    submit,
    write_connection,
)
from fedlora.methods import REGISTRY

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
RANKS = [8, 4, 2]


def tiny(strategy: str) -> RunConfig:
    ranks = str(RANKS) if REGISTRY[strategy].traits.mixed_ranks else "[4]"
    return load_config(TINY, [f"strategy={strategy}", f"clients.ranks={ranks}"])


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows]


def assert_same_run(flower: Path, inprocess: Path) -> None:
    got, want = adapter(flower), adapter(inprocess)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert losses(flower) == pytest.approx(losses(inprocess), rel=1e-5)


FLOWER_PROGRAMS = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp")


def flower_processes() -> list[psutil.Process]:
    """This test process's descendants that are Flower's: the SuperLink, the SuperExec it
    starts and the simulation or ServerApp process that runs a run (not always in the
    SuperLink's process group, so each is killed by its own id)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:  # a process may end between the listing and the question
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(program in cmdline for program in FLOWER_PROGRAMS):
            found.append(child)
    return found


def our_processes(marker: Path) -> list[str]:
    """Command lines of running processes that mention ``marker`` (our run folder)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if str(marker) in line]


class InProcess(dict[str, Path]):
    """The in-process run of each strategy's tiny config, made on first use."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, strategy: str) -> Path:
        run_experiment(tiny(strategy), self.root / strategy, progress=False)
        self[strategy] = self.root / strategy
        return self[strategy]


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return InProcess(tmp_path_factory.mktemp("inprocess"))


# every registered strategy; centralized and standalone are single-party references that run
# only in-process (serve() refuses them, tested in test_flower_refuses_single_party_references)
@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_flower_simulation_equals_the_inprocess_runner(
    strategy: str, inprocess: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Flower must not write there
    out = tmp_path / "run"

    if strategy == "fedit":  # through the command line, as a user runs it
        argv = ["run", str(TINY), "--engine", "flower", "--out", str(out), "--quiet"]
        argv += ["--set", "strategy=fedit", "--set", "clients.ranks=[4]"]
        assert main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())
    else:
        summary = run_simulation(tiny(strategy), out, echo=False)

    assert summary["engine"] == "flower" and summary["rounds"] == 2
    assert_same_run(out, inprocess[strategy])
    assert (out / "flower" / "config.toml").is_file()  # FLWR_HOME is inside the run folder
    assert not (tmp_path / "home" / ".flwr").exists()
    assert our_processes(out) == []  # the SuperLink and what it started are stopped


def test_flower_simulation_in_bfloat16_equals_the_inprocess_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the nodes restore their bfloat16 base from float32 masters exactly as the server merges
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(TINY, ["model.dtype=bfloat16", f"clients.ranks={RANKS}"])
    run_experiment(cfg, tmp_path / "inprocess", progress=False)

    summary = run_simulation(cfg, tmp_path / "flower", echo=False)

    assert summary["engine"] == "flower" and summary["dtype"] == "bfloat16"
    assert_same_run(tmp_path / "flower", tmp_path / "inprocess")


def test_flower_options_need_the_flower_engine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(TINY), "--superlink", "127.0.0.1:9093"]) == 2
    assert "need --engine flower" in capsys.readouterr().err
    argv = ["run", str(TINY), "--engine", "flower", "--root-certificates", "ca.crt"]
    assert main(argv) == 2
    assert "--root-certificates needs --superlink" in capsys.readouterr().err


def _deploy(out: Path, strategy: str, tls: bool, keep_model: bool = False) -> dict[str, object]:
    home = out.resolve() / "flower"
    with Processes(home, home / "logs") as procs:
        creds = make_certificates(out / "certs") if tls else None
        link, *ports = free_ports(1 + len(RANKS))
        address = procs.superlink(link, tls=creds, node_auth=tls)
        write_connection(home, address, creds[0] if creds else None)
        for k, rank in enumerate(RANKS):
            keys = None
            if tls:  # node authentication: only registered SuperNodes may connect
                keys = make_node_key(out / "keys", f"node-{k}")
                subprocess.run(
                    ["flwr", "supernode", "register", str(keys[1]), "fedlora"],
                    env=flower_env(home),
                    check=True,
                    capture_output=True,
                )
            root = creds[0] if creds else None
            node_config: dict[str, object] = {"partition-id": k, "rank": rank, "trust-server": True}
            if keep_model:
                node_config["keep-model"] = True
            procs.supernode(k, address, node_config, ports[k], root, keys)
        before = set(KEEPERS.glob("node-*.log")) if KEEPERS.exists() else set()
        summary = submit(tiny(strategy), out, address, creds[0] if creds else None, echo=False)
        pids = [p.pid for p in procs.started]
    for pid in pids:  # stopped by their process ids
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    if keep_model:
        _check_keepers(set(KEEPERS.glob("node-*.log")) - before, rounds=tiny(strategy).rounds)
    return summary


KEEPERS = Path(tempfile.gettempdir()) / f"fedlora-{os.getuid()}"
"""Where the nodes' model keepers live (``fedlora.flower.node.folder``)."""


def _check_keepers(logs: set[Path], rounds: int) -> None:
    """One model keeper per node, all of the same run; each answered the query and every round,
    loaded the model once, and stopped with the run, removing its folder (socket, key, lock)
    and leaving its log beside it."""
    assert len(logs) == len(RANKS), logs
    assert len({f.name.split("-run-")[1] for f in logs}) == 1, logs
    for path in logs:
        where = path.with_suffix("")
        assert not where.exists(), where
        log = path.read_text().splitlines()
        answers = [line.split()[0] for line in log if " answered in " in line]
        loads = [int(line.rsplit(" ", 1)[1]) for line in log if " answered in " in line]
        assert answers == ["query"] + ["train"] * rounds, log
        assert loads == [0] + [1] * rounds, log  # the query loads no model, the first train does
        assert log[-1].startswith("keeper stops: "), log
        path.unlink()


def test_deployment_superlink_and_three_supernodes(
    inprocess: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    summary = _deploy(out, "flora", tls=False)
    assert summary["engine"] == "flower" and len(summary["nodes"]) == 3  # type: ignore[arg-type]
    assert [c["rank"] for c in summary["clients"]] == RANKS  # type: ignore[index, union-attr]
    assert_same_run(out, inprocess["flora"])
    assert our_processes(out) == []
    log = (out / "flower" / "logs" / "superlink.log").read_text()
    assert "running on http://" in log.lower()  # the contrast to the TLS run below


def test_deployment_whose_nodes_keep_the_model_gives_the_same_run(
    inprocess: dict[str, Path], tmp_path: Path
) -> None:
    """``keep-model=true`` on every SuperNode: each node's ClientApps hand their messages to one
    keeper that loads the model once (``_check_keepers``), and the run is the in-process one."""
    out = tmp_path / "run"
    _deploy(out, "flora", tls=False, keep_model=True)
    assert_same_run(out, inprocess["flora"])
    assert our_processes(out) == []


def test_deployment_with_tls_and_node_authentication(
    inprocess: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _deploy(out, "flexlora", tls=True)
    assert_same_run(out, inprocess["flexlora"])
    log = (out / "flower" / "logs" / "superlink.log").read_text().lower()
    assert "running on https://" in log and "insecure" not in log


def test_bench_flower_prints_and_writes_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "flower.json"
    argv = ["bench", "flower", str(TINY), "--set", "rounds=1", "--workdir", str(tmp_path / "w")]
    assert main([*argv, "--node-threads", "0"]) == 2
    assert "--node-threads must be >= 1, got 0" in capsys.readouterr().err
    assert main([*argv, "--node-threads", "1", "--json", str(path)]) == 0

    figures = json.loads(path.read_text())
    inprocess = figures["inprocess_s_per_round"]
    assert inprocess > 0 and figures["flower_s_per_round"] > 0
    assert figures["ratio"] == pytest.approx(figures["flower_s_per_round"] / inprocess)
    assert figures["deployment_ratio"] == pytest.approx(
        figures["deployment_s_per_round"] / inprocess
    )
    assert figures["kept_ratio"] == pytest.approx(figures["kept_s_per_round"] / inprocess)
    assert figures["same_result"] is True and figures["deployment_same_result"] is True
    assert figures["kept_same_result"] is True
    assert figures["rounds"] == 1 and figures["node_threads"] == 1
    assert figures["provenance"]["machine"]["cpus"] == os.cpu_count()
    start = figures["clientapp_start"]
    assert start["process_s"] > start["import_s"] + start["data_s"] + start["model_s"]
    assert min(start["import_s"], start["data_s"], start["model_s"]) > 0
    printed = capsys.readouterr().out
    assert "| Flower simulation |" in printed and "| Flower deployment (local) |" in printed
    assert "| Flower deployment, nodes keep the model |" in printed
    assert "each deployment node on 1 CPU thread(s)" in printed
    assert our_processes(tmp_path / "w") == []


def test_a_supernode_that_dies_mid_run_fails_its_client_and_the_run_completes(
    tmp_path: Path,
) -> None:
    # node 2 is killed once round 1 is recorded; it may or may not have answered round 2 by
    # then, so it fails in round 2 or 3, and in every round after that
    out = tmp_path / "run"
    home = out.resolve() / "flower"
    overrides = ["clients.min_clients=2", "flower.round_timeout_s=60", "rounds=3"]
    cfg = load_config(TINY, overrides)
    with Processes(home, home / "logs") as procs:
        link, *ports = free_ports(4)
        address = procs.superlink(link)
        write_connection(home, address)
        nodes = [
            procs.supernode(k, address, {"partition-id": k, "trust-server": True}, ports[k])
            for k in range(3)
        ]

        def kill_node_2_after_round_1() -> None:
            metrics = out / "metrics.jsonl"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if metrics.exists() and metrics.read_text().count("\n") >= 2:
                    os.killpg(nodes[2].pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_node_2_after_round_1, daemon=True)
        killer.start()
        summary = submit(cfg, out, address, echo=False)
        killer.join(timeout=10)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 3 and "failed" not in rows[1]
    first = next(t for t in (2, 3) if "failed" in rows[t])
    for row in rows[first:]:
        assert list(row["failed"]) == ["client-0002"], row
        assert row["clients"] == ["client-0000", "client-0001"]
    assert our_processes(out) == []


def test_differential_privacy_runs_on_the_nodes_as_in_process(tmp_path: Path) -> None:
    """Clipping and noise happen in the client's training step on either engine: with a noise
    seed both give the same adapter, and it differs from the run without privacy."""
    private = ["privacy.clip_norm=0.05", "privacy.noise_multiplier=0.5", "privacy.noise_seed=3"]
    cfg = load_config(TINY, private)
    run_experiment(cfg, tmp_path / "inprocess", progress=False)
    summary = run_simulation(cfg, tmp_path / "flower", echo=False)
    assert_same_run(tmp_path / "flower", tmp_path / "inprocess")
    assert summary["privacy"]["epsilon_max"] > 0
    run_experiment(load_config(TINY), tmp_path / "plain", progress=False)
    assert not torch.allclose(
        adapter(tmp_path / "plain")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ],
        adapter(tmp_path / "flower")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ],
    )


def test_a_flower_run_whose_superlink_is_killed_resumes_to_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the SuperLink (and the ServerApp it runs) after round 1 of 5, then
    ``fedlora run --resume RUN_DIR --engine flower``: the same adapter and per-round losses as
    an uninterrupted run."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    overrides = ["rounds=5", "train.steps=10"]
    out = tmp_path / "run"
    argv = ["run", str(TINY), "--engine", "flower", "--out", str(out), "--quiet"]
    for o in overrides:
        argv += ["--set", o]
    killed: list[int] = []

    def kill_superlink_after_round_1() -> None:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                rows = metrics.read_text().count("\n") - 1
                for child in flower_processes():  # the SuperLink and the run it executes
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                        killed.append(rows)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_superlink_after_round_1, daemon=True)
    killer.start()
    assert main(argv) != 0
    killer.join(timeout=10)
    assert killed and killed[0] < 5, f"the SuperLink was not killed mid-run: {killed}"
    assert not (out / "summary.json").exists()
    assert our_processes(out) == []

    assert main(["run", "--resume", str(out), "--engine", "flower", "--quiet"]) == 0
    run_experiment(load_config(TINY, overrides), tmp_path / "inprocess", progress=False)
    assert_same_run(out, tmp_path / "inprocess")
    assert json.loads((out / "summary.json").read_text())["rounds"] == 5
    assert our_processes(out) == []


def test_compare_on_flower_equals_compare_in_process(tmp_path: Path) -> None:
    """``fedlora compare --engine flower`` runs each strategy on Flower's simulation engine and
    writes the same comparison as in-process: the newer methods, one with equal ranks (FedEx-
    LoRA) and one with a server option (FLoRIST)."""
    argv = ["compare", str(TINY), "--strategies", "fedex,florist", "--quiet"]
    argv += ["--set", "clients.ranks=[4]"]
    assert main([*argv, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    assert main([*argv, "--out", str(tmp_path / "inprocess")]) == 0
    for name in ("fedex", "florist"):
        assert_same_run(tmp_path / "flower" / name, tmp_path / "inprocess" / name)
    flower = json.loads((tmp_path / "flower" / "compare.json").read_text())
    inprocess = json.loads((tmp_path / "inprocess" / "compare.json").read_text())
    assert [flower[n]["engine"] for n in ("fedex", "florist")] == ["flower", "flower"]
    assert [flower[n]["final"] for n in flower] == pytest.approx(
        [inprocess[n]["final"] for n in inprocess], rel=1e-5
    )
    assert our_processes(tmp_path / "flower") == []


def test_a_terminated_flower_run_stops_every_process_it_started(tmp_path: Path) -> None:
    """SIGTERM to ``fedlora run --engine flower`` (as ``timeout`` or a scheduler sends it) once
    round 1 is recorded: the command exits with 143 and leaves no Flower process running."""
    out = tmp_path / "run"
    argv = ["run", str(TINY), "--engine", "flower", "--out", str(out), "--quiet"]
    argv += ["--set", "rounds=50", "--set", "train.steps=10"]
    code = f"import sys; from fedlora.cli import entry; sys.argv = {['fedlora', *argv]!r}; entry()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "round 1 never recorded"
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert not (out / "summary.json").exists()
    assert our_processes(out) == []


@pytest.mark.parametrize("strategy", ["centralized", "standalone"])
def test_flower_refuses_single_party_references(strategy: str, tmp_path: Path) -> None:
    from fedlora.errors import ConfigError
    from fedlora.flower.apps import serve

    cfg = load_config(TINY, [f"strategy={strategy}"])
    with pytest.raises(ConfigError, match="single-party reference point; run it in-process"):
        serve(None, cfg, tmp_path / "run")  # type: ignore[arg-type]  # refused before any node


def test_flower_refuses_to_resume_a_method_whose_clients_keep_state(tmp_path: Path) -> None:
    from fedlora.errors import ConfigError
    from fedlora.flower.apps import serve

    cfg = load_config(TINY, ["strategy=fedsa", "clients.ranks=[4]"])
    with pytest.raises(ConfigError, match="'fedsa' keeps client state on the nodes"):
        serve(None, cfg, tmp_path / "run", resume=True)  # type: ignore[arg-type]


def test_an_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    # Prepare: a SuperLink with TLS and node authentication, one registered key, one not
    out = tmp_path / "run"
    home = out.resolve() / "flower"
    with Processes(home, home / "logs") as procs:
        creds = make_certificates(out / "certs")
        link, port_0, port_1 = free_ports(3)
        address = procs.superlink(link, tls=creds, node_auth=True)
        write_connection(home, address, creds[0])
        registered = make_node_key(out / "keys", "node-0")
        stranger = make_node_key(out / "keys", "node-1")
        subprocess.run(
            ["flwr", "supernode", "register", str(registered[1]), "fedlora"],
            env=flower_env(home),
            check=True,
            capture_output=True,
        )

        # Execute: both SuperNodes try to connect
        procs.supernode(
            0, address, {"partition-id": 0, "trust-server": True}, port_0, creds[0], registered
        )
        procs.supernode(
            1, address, {"partition-id": 1, "trust-server": True}, port_1, creds[0], stranger
        )
        log = home / "logs" / "superlink.log"
        refused = "no supernode found with the given public key"
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:  # until the SuperLink has answered both
            text = log.read_text().lower()
            if "activated node_id" in text and refused in text:
                break
            time.sleep(0.2)

    # Assert: the registered node was activated, the stranger refused
    assert text.count("activated node_id") == 1 and refused in text, text

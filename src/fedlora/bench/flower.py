"""Benchmark: wall time per round in-process, on Flower's simulation engine and on a local Flower
deployment, on the same config, side by side in one command; and what one ClientApp process
costs before it trains.

All three run the same federation (same config and seed, so the same clients, ranks and math);
a round's time is from planning to the evaluated result (``seconds`` in ``metrics.jsonl``), and
the median over rounds is kept, so the one-time start of Flower's processes (SuperLink, Ray,
SuperNodes) shows in the totals, not in the per-round figure.

The three differ in where a client's work runs. In-process, one Python process trains the
clients one after another on one loaded model. Flower's simulation engine keeps its workers for
the run, so a worker loads the model once (``fedlora.flower.apps`` caches it per process). A
deployment (Flower 1.4x, ``subprocess`` isolation, the default) starts a new ClientApp process
for every message it handles, which imports torch, transformers and PEFT, builds the node's data
and loads the model before it trains: :func:`clientapp_start` measures those steps in a fresh
process, as a ClientApp runs them. With ``keep-model=true`` in the node config, a node's
ClientApps hand their messages to one model keeper per node (:mod:`fedlora.flower.node`), which
loads the model once; the fourth leg measures that. The local deployment runs its SuperNodes on
this one machine, so their clients train at the same time on the same cores.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedlora.bench.provenance import provenance
from fedlora.config import RunConfig, to_dict
from fedlora.errors import FedloraError
from fedlora.experiment import run_experiment
from fedlora.flower.launch import deployment_threads, run_deployment, run_simulation

# Run in a fresh interpreter: the steps a ClientApp process takes before it trains, timed.
_CLIENTAPP_START = """
import json, sys, time
t0 = time.perf_counter()
from fedlora.config import config_from_json
from fedlora.flower.apps import node_party
t1 = time.perf_counter()
from fedlora.flower.apps import node_client
cfg = config_from_json(open(sys.argv[1]).read(), sys.argv[1])
node_client(cfg, {"partition-id": 0, "trust-server": True})
t2 = time.perf_counter()
node_party(cfg, {"partition-id": 0, "trust-server": True})
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "data_s": t2 - t1, "model_s": t3 - t2}))
"""


@dataclass
class ClientAppStart:
    """What a new ClientApp process costs before it trains (seconds, measured in one)."""

    process_s: float
    """The whole process: interpreter start, imports, data, model."""
    import_s: float
    """Importing fedlora's ClientApp (torch, transformers, PEFT, Flower)."""
    data_s: float
    """Building the node's client: its partition of the data."""
    model_s: float
    """Loading the model and wrapping it for training."""


@dataclass
class FlowerBench:
    strategy: str
    model: str
    clients: int
    rounds: int
    inprocess_s_per_round: float
    flower_s_per_round: float
    """Flower's simulation engine."""
    deployment_s_per_round: float
    """A local deployment: a SuperLink and a SuperNode per client, as processes."""
    kept_s_per_round: float
    """The same deployment, each node keeping its model (``keep-model=true``)."""
    node_threads: int
    """The CPU threads each deployment node computed with (node config ``threads``)."""
    ratio: float
    """simulation / in-process, per round."""
    deployment_ratio: float
    """deployment / in-process, per round."""
    kept_ratio: float
    """deployment with ``keep-model`` / in-process, per round."""
    inprocess_total_s: float
    flower_total_s: float
    deployment_total_s: float
    kept_total_s: float
    """Whole runs, including model loading and (for Flower) starting its processes."""
    same_result: bool
    """The simulation's final held-out loss agrees with in-process to 1e-5 relative."""
    deployment_same_result: bool
    kept_same_result: bool
    """The same for the two deployments."""
    clientapp_start: ClientAppStart

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "provenance": provenance()}


def _round_seconds(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(r["seconds"]) for r in rows if r["round"] > 0]


def clientapp_start(cfg: RunConfig, workdir: Path) -> ClientAppStart:
    """Time, in a fresh Python process, what a ClientApp process does before it trains: import
    fedlora's ClientApp, build node 0's client, load the model (``node_party``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "clientapp-config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CLIENTAPP_START, str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise FedloraError(f"the ClientApp start measurement failed:\n{done.stderr[-2000:]}")
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    return ClientAppStart(process_s=process_s, **steps)


def run_flower_bench(cfg: RunConfig, workdir: Path, node_threads: int | None = None) -> FlowerBench:
    """Run ``cfg`` in-process, on Flower's simulation engine and on a local deployment without
    and with ``keep-model``, one after another in ``workdir``, then time a ClientApp process's
    start. ``node_threads``: each deployment node's CPU threads (default: the cores shared out,
    :func:`fedlora.flower.launch.deployment_threads`)."""
    node_threads = node_threads or deployment_threads(cfg.clients.num_clients)
    marks = [time.perf_counter()]
    inproc = run_experiment(cfg, workdir / "inprocess", progress=False)
    marks.append(time.perf_counter())
    flower = run_simulation(cfg, workdir / "flower", echo=False)
    marks.append(time.perf_counter())
    deployed = run_deployment(cfg, workdir / "deployment", echo=False, threads=node_threads)
    marks.append(time.perf_counter())
    kept = run_deployment(cfg, workdir / "kept", echo=False, keep_model=True, threads=node_threads)
    marks.append(time.perf_counter())
    start = clientapp_start(cfg, workdir / "clientapp")
    a = statistics.median(_round_seconds(workdir / "inprocess"))
    b = statistics.median(_round_seconds(workdir / "flower"))
    c = statistics.median(_round_seconds(workdir / "deployment"))
    d = statistics.median(_round_seconds(workdir / "kept"))

    def same(summary: dict[str, Any]) -> bool:
        return bool(abs(summary["final"] - inproc["final"]) <= 1e-5 * abs(inproc["final"]))

    return FlowerBench(
        strategy=cfg.label,
        model=cfg.model.name,
        clients=cfg.clients.num_clients,
        rounds=cfg.rounds,
        inprocess_s_per_round=a,
        flower_s_per_round=b,
        deployment_s_per_round=c,
        kept_s_per_round=d,
        node_threads=node_threads,
        ratio=b / a,
        deployment_ratio=c / a,
        kept_ratio=d / a,
        inprocess_total_s=marks[1] - marks[0],
        flower_total_s=marks[2] - marks[1],
        deployment_total_s=marks[3] - marks[2],
        kept_total_s=marks[4] - marks[3],
        same_result=same(flower),
        deployment_same_result=same(deployed),
        kept_same_result=same(kept),
        clientapp_start=start,
    )


def format_flower(result: FlowerBench) -> str:
    s = result.clientapp_start
    return "\n".join(
        [
            f"{result.strategy} on {result.model}, {result.clients} clients, "
            f"{result.rounds} rounds (median seconds per round; whole run in brackets); "
            f"each deployment node on {result.node_threads} CPU thread(s)",
            "",
            "| engine | s / round | whole run (s) | final loss as in-process |",
            "|---|---|---|---|",
            f"| in-process | {result.inprocess_s_per_round:.2f} | {result.inprocess_total_s:.1f} "
            "| - |",
            f"| Flower simulation | {result.flower_s_per_round:.2f} | "
            f"{result.flower_total_s:.1f} | {result.same_result} |",
            f"| Flower deployment (local) | {result.deployment_s_per_round:.2f} | "
            f"{result.deployment_total_s:.1f} | {result.deployment_same_result} |",
            f"| Flower deployment, nodes keep the model | {result.kept_s_per_round:.2f} | "
            f"{result.kept_total_s:.1f} | {result.kept_same_result} |",
            "",
            f"per round / in-process: simulation {result.ratio:.2f}, deployment "
            f"{result.deployment_ratio:.2f}, deployment keeping the model {result.kept_ratio:.2f}",
            f"a new ClientApp process before it trains (deployment: every message): "
            f"{s.process_s:.2f} s (imports {s.import_s:.2f}, data {s.data_s:.2f}, "
            f"model {s.model_s:.2f})",
        ]
    )

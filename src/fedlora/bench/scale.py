"""Study 5: peak memory and seconds per round with 10 and with 1,000 registered clients, 10
sampled per round, on the same config otherwise; in-process, or on Flower's simulation engine.

Each side runs in a fresh Python process (``python -m fedlora.bench.scale``), so its peak
memory is its own: model, data, every registered client's partition and state, the rounds.
In-process that is the process's peak resident set (``ru_maxrss``). On Flower (``engine =
"flower"``: a SuperLink in simulation mode with one SuperNode per registered client, the
ClientApps in Ray's workers) it is the peak, sampled every half second, of the summed
proportional set size (PSS: shared pages divided among their processes, so nothing is counted
twice) of the process and every process it started: SuperLink, SuperExec, the simulation
process with its ServerApp and every node's context, Ray and its workers. Seconds per round are
the median of the rounds' wall times (``metrics.jsonl``). The target is ``rss_ratio = rss_1000 /
rss_10 ≤ 1.1``: registering clients must cost memory in proportion to their data, not to the
model.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from fedlora.bench.provenance import provenance
from fedlora.config import RunConfig, config_from_json, to_dict
from fedlora.errors import FedloraError

SAMPLED = 10


DEFAULT_SET = [
    "rounds=3",
    "train.steps=2",
    "data.source=mmlu",
    "data.heldout=32",
    "model.max_length=64",
]
"""The defaults of ``fedlora bench scale``: MMLU has enough questions to give each of 1,000
clients full batches, so both sides do the same work per step."""


def scaled(cfg: RunConfig, registered: int, sampled: int = SAMPLED) -> RunConfig:
    """``cfg`` with ``registered`` clients of which ``sampled`` (at most all) take part in each
    round."""
    import dataclasses

    clients = dataclasses.replace(
        cfg.clients, num_clients=registered, fraction=min(sampled, registered) / registered
    )
    return dataclasses.replace(cfg, clients=clients)


ENGINES = ("inprocess", "flower")


def measure(cfg: RunConfig, workdir: Path, engine: str = "inprocess") -> dict[str, Any]:
    """Run ``cfg`` in a fresh process on ``engine``; its peak memory (MB) and median seconds
    per round."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "scale-config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    done = subprocess.run(
        [sys.executable, "-m", "fedlora.bench.scale", str(config), str(workdir / "run"), engine],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FedloraError(
            f"the {cfg.clients.num_clients}-client run failed:\n{done.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_scale_bench(
    cfg: RunConfig, workdir: Path, engine: str = "inprocess", sampled: int = SAMPLED
) -> dict[str, Any]:
    """Both sides, 10 then 1,000 registered clients, ``sampled`` of them per round (all 10 on
    the small side where ``sampled`` exceeds 10), on ``engine`` (``inprocess`` or ``flower``);
    the figures the issue names, and more."""
    if engine not in ENGINES:
        raise FedloraError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    small = measure(scaled(cfg, 10, sampled), workdir / "clients-10", engine)
    large = measure(scaled(cfg, 1000, sampled), workdir / "clients-1000", engine)
    batch = cfg.train.batch_size * cfg.train.grad_accum
    if large["min_examples"] < batch:
        raise FedloraError(
            f"with 1,000 clients some hold only {large['min_examples']} examples, fewer than a "
            f"batch of {batch}: the two sides would not do the same work per step; use a larger "
            "data source (the default is mmlu) or a smaller train.batch_size"
        )
    return {
        "rss_10": small["rss_mb"],
        "rss_1000": large["rss_mb"],
        "rss_ratio": large["rss_mb"] / small["rss_mb"],
        "s_per_round_10": small["s_per_round"],
        "s_per_round_1000": large["s_per_round"],
        "rounds": cfg.rounds,
        "sampled_per_round": sampled,
        "sampled_10": min(sampled, 10),
        "model": cfg.model.name,
        "engine": engine,
        "memory": "peak RSS of the process" if engine == "inprocess" else MEMORY_FLOWER,
        "config": to_dict(scaled(cfg, 1000, sampled)),
        "provenance": provenance(),
    }


def format_scale(result: dict[str, Any]) -> str:
    large = result["sampled_per_round"]
    small = result.get("sampled_10", large)
    return "\n".join(
        [
            f"{result['model']} on {result.get('engine', 'inprocess')}, "
            f"{result['rounds']} rounds; memory: "
            f"{result.get('memory', 'peak RSS of the process')}",
            "",
            "| registered clients | sampled / round | peak memory (MB) | s / round |",
            "|---|---|---|---|",
            f"| 10 | {small} | {result['rss_10']:.0f} | {result['s_per_round_10']:.2f} |",
            f"| 1,000 | {large} | {result['rss_1000']:.0f} | {result['s_per_round_1000']:.2f} |",
            "",
            f"rss_ratio = {result['rss_ratio']:.3f} (target ≤ 1.1); seconds per round ratio "
            f"{result['s_per_round_1000'] / result['s_per_round_10']:.3f}",
        ]
    )


def plot_scale(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.5), dpi=100)
    labels = ["10", "1,000"]
    a.bar(labels, [result["rss_10"], result["rss_1000"]], color="tab:blue")
    a.set_ylabel("peak memory (MB)")
    a.set_xlabel("registered clients")
    b.bar(labels, [result["s_per_round_10"], result["s_per_round_1000"]], color="tab:orange")
    b.set_ylabel("seconds per round")
    b.set_xlabel("registered clients")
    engine = result.get("engine", "inprocess")
    fig.suptitle(f"registered clients ({result['model']}, {engine})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_scale(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "scale.json", out / "scale.md", out / "scale.png"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text("# Scale: registered clients\n\n" + format_scale(result) + "\n")
    plot_scale(result, paths[2])
    return paths


MEMORY_FLOWER = "peak summed PSS of every process of the run (sampled every 0.5 s)"


def _worker(config_path: str, out: str, engine: str) -> None:
    cfg = config_from_json(Path(config_path).read_text(), config_path)
    if engine == "flower":
        from fedlora.flower.launch import run_simulation

        with PeakMemory() as peak:
            run_simulation(cfg, Path(out), echo=False)
        memory_mb = peak.mb
    else:
        from fedlora.experiment import run_experiment

        run_experiment(cfg, Path(out), progress=False)
        memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seconds = [float(r["seconds"]) for r in rows if r["round"] > 0]
    clients = json.loads((Path(out) / "summary.json").read_text())["clients"]
    figures = {
        "rss_mb": memory_mb,
        "s_per_round": statistics.median(seconds),
        "min_examples": min(c["examples"] for c in clients),
    }
    print(json.dumps(figures))


class PeakMemory:
    """The peak, sampled every ``interval_s``, of the summed PSS of this process and all its
    descendants, in MB (:attr:`mb`), while the ``with`` block runs."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:  # a process may end between the listing and the question
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    continue
            self.mb = max(self.mb, total / 2**20)
            self._stop.wait(self.interval_s)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "inprocess")

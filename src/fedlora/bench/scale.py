"""Study 5: peak memory and seconds per round with 10 and with 1,000 registered clients, 10
sampled per round, on the same config otherwise.

Each side runs in a fresh Python process (``python -m fedlora.bench.scale``), so its peak
resident set (``ru_maxrss``) is its own: model, data, every registered client's partition and
state, the rounds. Seconds per round are the median of the rounds' wall times
(``metrics.jsonl``). The target is ``rss_ratio = rss_1000 / rss_10 ≤ 1.1``: registering clients
must cost memory in proportion to their data, not to the model.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def scaled(cfg: RunConfig, registered: int) -> RunConfig:
    """``cfg`` with ``registered`` clients of which ``SAMPLED`` take part in each round."""
    import dataclasses

    clients = dataclasses.replace(
        cfg.clients, num_clients=registered, fraction=SAMPLED / registered
    )
    return dataclasses.replace(cfg, clients=clients)


def measure(cfg: RunConfig, workdir: Path) -> dict[str, Any]:
    """Run ``cfg`` in a fresh process; its peak RSS (MB) and median seconds per round."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "scale-config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    done = subprocess.run(
        [sys.executable, "-m", "fedlora.bench.scale", str(config), str(workdir / "run")],
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


def run_scale_bench(cfg: RunConfig, workdir: Path) -> dict[str, Any]:
    """Both sides, 10 then 1,000 registered clients; the figures the issue names, and more."""
    small = measure(scaled(cfg, 10), workdir / "clients-10")
    large = measure(scaled(cfg, 1000), workdir / "clients-1000")
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
        "sampled_per_round": SAMPLED,
        "model": cfg.model.name,
        "config": to_dict(scaled(cfg, 1000)),
        "provenance": provenance(),
    }


def format_scale(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{result['model']}, {result['sampled_per_round']} clients sampled per round, "
            f"{result['rounds']} rounds; peak RSS of the whole process",
            "",
            "| registered clients | peak RSS (MB) | s / round |",
            "|---|---|---|",
            f"| 10 | {result['rss_10']:.0f} | {result['s_per_round_10']:.2f} |",
            f"| 1,000 | {result['rss_1000']:.0f} | {result['s_per_round_1000']:.2f} |",
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
    a.set_ylabel("peak RSS (MB)")
    a.set_xlabel("registered clients")
    b.bar(labels, [result["s_per_round_10"], result["s_per_round_1000"]], color="tab:orange")
    b.set_ylabel("seconds per round")
    b.set_xlabel("registered clients")
    fig.suptitle(f"{result['sampled_per_round']} clients sampled per round ({result['model']})")
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


def _worker(config_path: str, out: str) -> None:
    from fedlora.experiment import run_experiment

    cfg = config_from_json(Path(config_path).read_text(), config_path)
    run_experiment(cfg, Path(out), progress=False)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seconds = [float(r["seconds"]) for r in rows if r["round"] > 0]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    clients = json.loads((Path(out) / "summary.json").read_text())["clients"]
    figures = {
        "rss_mb": rss_mb,
        "s_per_round": statistics.median(seconds),
        "min_examples": min(c["examples"] for c in clients),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

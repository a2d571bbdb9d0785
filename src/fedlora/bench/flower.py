"""Benchmark: wall time per round through Flower's simulation engine versus the in-process
runner, on the same config, side by side in one command.

Both run the same federation (same config and seed, so the same clients, ranks and math); a
round's time is from planning to the evaluated result (``seconds`` in ``metrics.jsonl``), and
the median over rounds is kept, so the one-time start of Flower's processes (SuperLink, Ray,
the first ClientApp loading the model) shows in the totals, not in the per-round figure.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.experiment import run_experiment
from fedlora.flower.launch import run_simulation


@dataclass
class FlowerBench:
    strategy: str
    model: str
    clients: int
    rounds: int
    inprocess_s_per_round: float
    flower_s_per_round: float
    ratio: float
    """flower / in-process, per round."""
    inprocess_total_s: float
    flower_total_s: float
    """Whole runs, including model loading and (for Flower) starting its processes."""
    same_result: bool
    """The final held-out loss agrees to 1e-5 relative."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _round_seconds(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(r["seconds"]) for r in rows if r["round"] > 0]


def run_flower_bench(cfg: RunConfig, workdir: Path) -> FlowerBench:
    """Run ``cfg`` in-process, then on Flower's simulation engine, in ``workdir``."""
    start = time.perf_counter()
    inproc = run_experiment(cfg, workdir / "inprocess", progress=False)
    middle = time.perf_counter()
    flower = run_simulation(cfg, workdir / "flower", echo=False)
    end = time.perf_counter()
    a = statistics.median(_round_seconds(workdir / "inprocess"))
    b = statistics.median(_round_seconds(workdir / "flower"))
    same = abs(flower["final"] - inproc["final"]) <= 1e-5 * abs(inproc["final"])
    return FlowerBench(
        strategy=cfg.strategy,
        model=cfg.model.name,
        clients=cfg.clients.num_clients,
        rounds=cfg.rounds,
        inprocess_s_per_round=a,
        flower_s_per_round=b,
        ratio=b / a,
        inprocess_total_s=middle - start,
        flower_total_s=end - middle,
        same_result=same,
    )


def format_flower(result: FlowerBench) -> str:
    return "\n".join(
        [
            f"{result.strategy} on {result.model}, {result.clients} clients, "
            f"{result.rounds} rounds (median seconds per round; whole run in brackets)",
            "",
            "| engine | s / round | whole run (s) |",
            "|---|---|---|",
            f"| in-process | {result.inprocess_s_per_round:.2f} | {result.inprocess_total_s:.1f} |",
            f"| Flower simulation | {result.flower_s_per_round:.2f} | "
            f"{result.flower_total_s:.1f} |",
            "",
            f"ratio Flower / in-process per round: {result.ratio:.2f}; "
            f"same final loss: {result.same_result}",
        ]
    )

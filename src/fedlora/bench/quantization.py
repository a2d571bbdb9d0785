"""Benchmark: what a quantized client (``clients.quantization``) costs and saves.

1. Per quantization (``none``, ``8bit``, ``4bit``) × LoRA rank: one client in a process of its
   own (so its peak is its own): the base model loaded in that quantization, then fedlora's
   client path for one round of ``steps`` local steps (a warm-up round first), on synthetic
   batches of ``batch_size`` × ``seq_len`` tokens. Reported: the process's peak resident memory
   (``ru_maxrss``), the model's weight bytes (``get_memory_footprint``) and seconds per step.
2. Per quantization: the default run (``fedlora run``'s config) with every client quantized so:
   the held-out loss of the global model (evaluated by the server in full precision) and the
   run's wall seconds.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora.models import QUANTIZATIONS


@dataclass
class ClientCost:
    quantization: str
    rank: int
    peak_rss_mb: float
    weights_mb: float
    s_per_step: float


@dataclass
class QuantizationBench:
    model: str
    dtype: str
    steps: int
    batch_size: int
    seq_len: int
    clients: list[ClientCost] = field(default_factory=list)
    runs: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per quantization: ``loss`` (final held-out loss of the default run) and ``seconds``."""

    def to_json(self) -> dict[str, Any]:
        from fedlora.bench.provenance import provenance

        return {**asdict(self), "provenance": provenance()}


def client_cost(
    model: str,
    quantization: str,
    rank: int,
    steps: int,
    batch_size: int,
    seq_len: int,
    device: str = "auto",
) -> dict[str, Any]:
    """One client's cost on ``device``, measured in this process (:func:`run_quantization_bench`
    calls it in a fresh one)."""
    from fedlora.bench.overhead import fedlora_client, synthetic_data
    from fedlora.config import TrainConfig
    from fedlora.models import load_model
    from fedlora.precision import dtype_name

    loaded = load_model(model, device=device, quantization=quantization)
    pad_id = int(loaded.tokenizer.pad_token_id)
    data = synthetic_data(loaded.model.config.vocab_size, steps * batch_size, seq_len, seed=0)
    cfg = TrainConfig(lr=1e-4, steps=steps, batch_size=batch_size, max_grad_norm=1.0)
    fedlora_client(loaded.model, data, cfg, rank, pad_id, seed=0)  # warm-up
    start = time.perf_counter()
    fedlora_client(loaded.model, data, cfg, rank, pad_id, seed=1)
    seconds = time.perf_counter() - start
    return {
        "quantization": quantization,
        "rank": rank,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weights_mb": loaded.model.get_memory_footprint() / 2**20,
        "s_per_step": seconds / steps,
        "dtype": dtype_name(loaded.dtype),
    }


def run_quantization_bench(
    workdir: Path,
    model: str = "smollm2-135m",
    ranks: Sequence[int] = (4, 16, 64),
    steps: int = 5,
    batch_size: int = 4,
    seq_len: int = 64,
    runs: bool = True,
    overrides: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    device: str = "auto",
) -> QuantizationBench:
    """Every quantization × rank in a process of its own, then (``runs``) the default run per
    quantization with ``overrides``."""
    from fedlora.config import load_config
    from fedlora.experiment import run_experiment

    say = progress or (lambda _msg: None)
    bench: QuantizationBench | None = None
    costs = []
    for q in QUANTIZATIONS:
        for r in ranks:
            say(f"one client, {q}, rank {r}")
            args = [model, q, str(r), str(steps), str(batch_size), str(seq_len), device]
            out = subprocess.run(
                [sys.executable, "-m", "fedlora.bench.quantization", *args],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"the {q} rank-{r} client failed:\n{out.stderr[-2000:]}")
            cost = json.loads(out.stdout.strip().splitlines()[-1])
            dtype = cost.pop("dtype")
            costs.append(ClientCost(**cost))
    bench = QuantizationBench(model, dtype, steps, batch_size, seq_len, costs)
    for q in QUANTIZATIONS if runs else ():
        say(f"the default run, every client {q}")
        cfg = load_config(
            None,
            [
                f"model.name={model}",
                f"model.device={device}",
                *overrides,
                f'clients.quantization=["{q}"]',
            ],
        )
        summary = run_experiment(cfg, workdir / q, progress=False)
        bench.runs[q] = {"loss": float(summary["final"]), "seconds": float(summary["seconds"])}
    return bench


def format_quantization(b: QuantizationBench) -> str:
    lines = [
        f"one client of {b.model} ({b.dtype} compute), {b.steps} steps of {b.batch_size} × "
        f"{b.seq_len} tokens, a process each:",
        "",
        "| quantization | rank | peak memory (MB) | weights (MB) | s/step |",
        "|---|---|---|---|---|",
    ]
    for c in b.clients:
        lines.append(
            f"| {c.quantization} | {c.rank} | {c.peak_rss_mb:.0f} | {c.weights_mb:.0f} | "
            f"{c.s_per_step:.3f} |"
        )
    if b.runs:
        lines += [
            "",
            "the default run with every client so quantized (the server evaluates in full "
            "precision):",
            "",
            "| quantization | held-out loss | run seconds |",
            "|---|---|---|",
        ]
        lines += [f"| {q} | {r['loss']:.4f} | {r['seconds']:.1f} |" for q, r in b.runs.items()]
    return "\n".join(lines)


if __name__ == "__main__":  # one client's cost in a fresh process: a JSON line
    name, q, r, n, bs, length, where = sys.argv[1:8]
    result = client_cost(name, q, int(r), int(n), int(bs), int(length), where)
    print(json.dumps(result))

"""Benchmark: a round's clients trained one at a time against together (``train.fuse``), side by
side in one process, on the default model in the default dtype.

For a group of clients (the default run's 3, ranks 16, 8 and 4; and 10 with FLoRA's ranks), each
with its own synthetic data of ``steps × batch_size`` sequences:

- **sequential**: fedlora's client path for each in turn (attach, :func:`fedlora.train.train_local`,
  read, detach);
- **fused**: all attached side by side and trained by :func:`fedlora.train.train_fused`, one pass
  over the base for every client's batch;
- **the bound batching alone allows**: one client's seconds per example at its own batch over its
  seconds per example at the group's total batch (one rank-8 adapter, the same steps), what the
  fused side could gain if carrying more rows were all it did.

Sides alternate in an order rotated every repeat (:func:`fedlora.bench.overhead.alternate`); the
medians are kept. The fused side's achieved GFLOP/s is set against the dtype's measured matmul
peak (:func:`fedlora.bench.precision.matmul_peak`), with the products counted as
:func:`fedlora.bench.precision.step_flops` counts them. Peak memory: CUDA's allocator high-water
mark on a GPU; on the CPU, the process's resident set sampled every 5 ms, above where it was
before the side began.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from fedlora import adapters
from fedlora.bench.overhead import TARGETS, alternate, synthetic_data
from fedlora.bench.precision import matmul_peak, step_flops
from fedlora.config import TrainConfig
from fedlora.data.encode import Encoded
from fedlora.devices import allocated_mb, peak_memory_mb, reset_peak_memory, synchronize
from fedlora.models import load_model
from fedlora.precision import dtype_name
from fedlora.train import Member, train_fused, train_local

GROUPS = {3: [16, 8, 4], 10: [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]}
"""The ranks of each group benchmarked, by its size: the default run's clients, and FLoRA's."""


@dataclass
class FusedGroup:
    clients: int
    ranks: list[int]
    sequential_s: float
    fused_s: float
    speedup: float
    """Client-steps per second fused over sequential."""
    bound: float
    """One client's seconds per example at its own batch over at the group's total batch."""
    of_bound: float
    """``speedup / bound``."""
    fused_gflops: float
    peak_sequential_mb: float
    peak_fused_mb: float


@dataclass
class FusedBench:
    model: str
    dtype: str
    device: str
    steps: int
    repeats: int
    batch_size: int
    seq_len: int
    peak_gflops: float
    groups: list[FusedGroup]
    torch_threads: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for g in self.groups:
            out[f"speedup_{g.clients}"] = g.speedup
            out[f"bound_{g.clients}"] = g.bound
            out[f"of_bound_{g.clients}"] = g.of_bound
        return out


class _Peak:
    """The most memory a side held above where it started (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0

    def measure(self, run: Callable[[], float]) -> float:
        start_mb = allocated_mb(self.device)
        if start_mb is not None:  # the allocator's own high-water mark
            reset_peak_memory(self.device)
            seconds = run()
            self.mb = max(self.mb, (peak_memory_mb(self.device) or 0.0) - start_mb)
            return seconds
        process = psutil.Process()
        start, high = process.memory_info().rss, [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                high[0] = max(high[0], process.memory_info().rss)
                time.sleep(0.005)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        try:
            seconds = run()
        finally:
            done.set()
            watcher.join()
        self.mb = max(self.mb, (high[0] - start) / 2**20)
        return seconds


def sequential(
    model: Any, data: Sequence[list[Encoded]], ranks: Sequence[int], cfg: TrainConfig, pad: int
) -> float:
    """fedlora's client path for each client in turn; seconds."""
    start = time.perf_counter()
    for k, rank in enumerate(ranks):
        peft_model = adapters.attach(model, TARGETS, rank, 2.0 * rank, seed=k)
        train_local(peft_model, data[k], cfg, pad, seed=k)
        adapters.read_factors(peft_model)
        model = adapters.detach(peft_model)
    synchronize(next(model.parameters()).device)
    return time.perf_counter() - start


def fused(
    model: Any, data: Sequence[list[Encoded]], ranks: Sequence[int], cfg: TrainConfig, pad: int
) -> float:
    """All clients attached side by side and trained in one pass a step; seconds."""
    start = time.perf_counter()
    names = [f"client-{k}" for k in range(len(ranks))]
    peft_model = model
    for k, rank in enumerate(ranks):
        peft_model = adapters.attach(peft_model, TARGETS, rank, 2.0 * rank, seed=k,
                                     adapter=names[k])  # fmt: skip
    adapters.train_adapters(peft_model, names)
    members = [
        Member(name, data[k], cfg, k, adapters.trainable(peft_model, name))
        for k, name in enumerate(names)
    ]
    train_fused(peft_model, members, pad)
    for name in names:
        adapters.read_factors(peft_model, name)
    model = adapters.detach(peft_model)
    synchronize(next(model.parameters()).device)
    return time.perf_counter() - start


def run_fused_bench(
    model_name: str = "smollm2-135m",
    steps: int = 4,
    repeats: int = 3,
    batch_size: int = 4,
    seq_len: int = 64,
    sizes: Sequence[int] = (3, 10),
    dtype: str = "auto",
    progress: Callable[[str], None] | None = None,
    device: str = "auto",
) -> FusedBench:
    say = progress or (lambda _msg: None)
    loaded = load_model(model_name, device=device, dtype=dtype)
    model, pad = loaded.model, int(loaded.tokenizer.pad_token_id)
    groups = [
        _group(model, pad, loaded.device, size, steps, repeats, batch_size, seq_len, say)
        for size in sizes
    ]
    say("matmul peak")
    return FusedBench(
        model=model_name,
        dtype=dtype_name(loaded.dtype),
        device=str(loaded.device),
        steps=steps,
        repeats=repeats,
        batch_size=batch_size,
        seq_len=seq_len,
        peak_gflops=matmul_peak(loaded.dtype, loaded.device),
        groups=groups,
        torch_threads=torch.get_num_threads(),
    )


def _group(
    model: Any,
    pad: int,
    device: torch.device,
    size: int,
    steps: int,
    repeats: int,
    batch_size: int,
    seq_len: int,
    say: Callable[[str], None],
) -> FusedGroup:
    """One group of ``size`` clients: the sides timed alternately, and what they give."""
    ranks = GROUPS[size] if size in GROUPS else [8] * size
    vocab = model.config.vocab_size
    data = [synthetic_data(vocab, steps * batch_size, seq_len, seed=k) for k in range(size)]
    cfg = TrainConfig(lr=1e-4, steps=steps, batch_size=batch_size, max_grad_norm=1.0)
    wide = TrainConfig(lr=1e-4, steps=steps, batch_size=batch_size * size, max_grad_norm=1.0)
    pooled = [e for d in data for e in d]
    say(f"{size} clients: warm-up")
    fused(model, data, ranks, cfg, pad)
    peaks = {"sequential": _Peak(device), "fused": _Peak(device)}
    seconds = alternate(
        {
            "sequential": lambda i: peaks["sequential"].measure(
                lambda: sequential(model, data, ranks, cfg, pad)
            ),
            "fused": lambda i: peaks["fused"].measure(lambda: fused(model, data, ranks, cfg, pad)),
            "one": lambda i: sequential(model, data[:1], [8], cfg, pad),
            "wide": lambda i: sequential(model, [pooled], [8], wide, pad),
        },
        repeats,
        lambda msg: say(f"{size} clients: {msg}"),
    )
    speedup = seconds["sequential"] / seconds["fused"]
    bound = (seconds["one"] / batch_size) / (seconds["wide"] / (batch_size * size))
    labelled = seq_len - seq_len // 2
    flop = steps * step_flops(model, size * batch_size * seq_len, size * batch_size * labelled)
    return FusedGroup(
        clients=size,
        ranks=list(ranks),
        sequential_s=seconds["sequential"],
        fused_s=seconds["fused"],
        speedup=speedup,
        bound=bound,
        of_bound=speedup / bound,
        fused_gflops=flop / seconds["fused"] / 1e9,
        peak_sequential_mb=peaks["sequential"].mb,
        peak_fused_mb=peaks["fused"].mb,
    )


def format_fused(result: FusedBench) -> str:
    lines = [
        f"a round's clients, one at a time vs fused: {result.model} in {result.dtype} on "
        f"{result.device}, batch {result.batch_size} x {result.seq_len} tokens a client, "
        f"{result.steps} steps, median of {result.repeats}",
        "| clients | ranks | sequential s | fused s | speedup | bound | of bound | fused GFLOP/s "
        "| peak MiB seq / fused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result.groups:
        lines.append(
            f"| {g.clients} | {g.ranks} | {g.sequential_s:.2f} | {g.fused_s:.2f} | "
            f"{g.speedup:.2f}x | {g.bound:.2f}x | {100 * g.of_bound:.0f} % | "
            f"{g.fused_gflops:.0f} | {g.peak_sequential_mb:.0f} / {g.peak_fused_mb:.0f} |"
        )
    lines.append(f"{result.dtype} matmul peak: {result.peak_gflops:.0f} GFLOP/s")
    return "\n".join(lines)

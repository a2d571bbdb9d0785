"""Benchmark: seconds per local training step through fedlora's client code versus a bare
torch + peft loop, on the same model (in the same dtype), batch and seed, side by side in one
process.

Both sides train a fresh rank-``r`` LoRA on the same fixed batches; they alternate, in an order
rotated every repeat, so drift of the machine's speed hits all sides alike; the median is kept.
The fedlora side is the whole client path of a round: attach, ``collate``d batches through
:func:`fedlora.train.train_local`, read factors, detach; a third side adds HAFL's importance
tracking.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedlora import adapters
from fedlora.clients import Callbacks
from fedlora.config import TrainConfig
from fedlora.data.encode import Encoded, collate
from fedlora.devices import HOST, synchronize
from fedlora.models import load_model
from fedlora.precision import dtype_name
from fedlora.train import train_local

TARGETS = ["q_proj", "v_proj"]


@dataclass
class StepBench:
    """The setting of a benchmark of local training steps."""

    model: str
    dtype: str
    steps: int
    repeats: int
    batch_size: int
    seq_len: int
    rank: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OverheadBench(StepBench):
    bare_s_per_step: float
    fedlora_s_per_step: float
    ratio: float
    importance_s_per_step: float
    importance_ratio: float
    """fedlora's client path with HAFL importance tracking, against the bare loop."""
    torch_threads: int


def synthetic_data(vocab: int, n: int, seq_len: int, seed: int) -> list[Encoded]:
    """``n`` random sequences; loss on the second half (a prompt/response split)."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq_len,), generator=gen, device=HOST).tolist()
        labels = [-100] * (seq_len // 2) + ids[seq_len // 2 :]
        data.append(Encoded(input_ids=ids, labels=labels))
    return data


def bare_loop(
    model: Any, data: list[Encoded], cfg: TrainConfig, rank: int, pad_id: int, seed: int
) -> float:
    """What a user would write with torch and peft alone; returns seconds."""
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    peft_model.train()
    order = torch.randperm(len(data), generator=gen, device=HOST).tolist()
    for step in range(cfg.steps):
        idx = order[(step * cfg.batch_size) % len(order) :][: cfg.batch_size]
        batch = {k: v.to(device) for k, v in collate([data[i] for i in idx], pad_id).items()}
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peft_model.unload()
    synchronize(device)
    return time.perf_counter() - start


def fedlora_client(
    model: Any,
    data: list[Encoded],
    cfg: TrainConfig,
    rank: int,
    pad_id: int,
    seed: int,
    importance: bool = False,
) -> float:
    """fedlora's client path for one round (optionally tracking HAFL importance); seconds."""
    start = time.perf_counter()
    peft_model = adapters.attach(model, TARGETS, rank, 2.0 * rank, seed=seed)
    tracker = adapters.importance_tracker(peft_model) if importance else None
    callbacks = Callbacks(on_step=tracker.step if tracker is not None else None)
    train_local(peft_model, data, cfg, pad_id, seed, callbacks=callbacks)
    if tracker is not None:
        tracker.scores()
    adapters.read_factors(peft_model)
    adapters.detach(peft_model)
    return time.perf_counter() - start


def alternate(
    sides: dict[str, Callable[[int], float]], repeats: int, say: Callable[[str], None]
) -> dict[str, float]:
    """The median seconds of each side over ``repeats`` calls (the call's index as its seed),
    alternating in an order rotated every repeat so that drift of the machine's speed hits every
    side alike."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for i in range(repeats):
        say(f"repeat {i + 1}/{repeats}")
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            times[name].append(sides[name](i))
    return {name: statistics.median(t) for name, t in times.items()}


def run_overhead_bench(
    model_name: str = "smollm2-135m",
    steps: int = 5,
    repeats: int = 5,
    batch_size: int = 4,
    seq_len: int = 64,
    rank: int = 8,
    dtype: str = "auto",
    progress: Callable[[str], None] | None = None,
    device: str = "auto",
) -> OverheadBench:
    say = progress or (lambda _msg: None)
    loaded = load_model(model_name, device=device, dtype=dtype)
    model = loaded.model
    pad_id = int(loaded.tokenizer.pad_token_id)
    data = synthetic_data(model.config.vocab_size, steps * batch_size, seq_len, seed=0)
    cfg = TrainConfig(lr=1e-4, steps=steps, batch_size=batch_size, max_grad_norm=1.0)
    bare_loop(model, data, cfg, rank, pad_id, seed=0)  # warm-up, not timed
    seconds = alternate(
        {
            "bare": lambda i: bare_loop(model, data, cfg, rank, pad_id, seed=i),
            "fedlora": lambda i: fedlora_client(model, data, cfg, rank, pad_id, seed=i),
            "importance": lambda i: fedlora_client(
                model, data, cfg, rank, pad_id, seed=i, importance=True
            ),
        },
        repeats,
        say,
    )
    bare_s, ours_s, tracked_s = (seconds[k] / steps for k in ("bare", "fedlora", "importance"))
    return OverheadBench(
        model=model_name,
        dtype=dtype_name(loaded.dtype),
        steps=steps,
        repeats=repeats,
        batch_size=batch_size,
        seq_len=seq_len,
        rank=rank,
        bare_s_per_step=bare_s,
        fedlora_s_per_step=ours_s,
        ratio=ours_s / bare_s,
        importance_s_per_step=tracked_s,
        importance_ratio=tracked_s / bare_s,
        torch_threads=torch.get_num_threads(),
    )


def format_overhead(result: OverheadBench) -> str:
    return (
        f"local training, {result.model} in {result.dtype}, "
        f"batch {result.batch_size} x {result.seq_len} tokens, "
        f"rank {result.rank}, {result.steps} steps, median of {result.repeats}\n"
        f"bare torch + peft: {result.bare_s_per_step:.3f} s/step\n"
        f"fedlora client:    {result.fedlora_s_per_step:.3f} s/step\n"
        f"ratio: {result.ratio:.3f}\n"
        f"fedlora client with HAFL importance tracking: {result.importance_s_per_step:.3f} s/step "
        f"(ratio {result.importance_ratio:.3f})"
    )

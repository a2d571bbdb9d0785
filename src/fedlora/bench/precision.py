"""Benchmark: what the compute dtype buys and what it costs, side by side in one process.

1. Seconds per local step (fresh rank-``r`` LoRA on q/v, synthetic batches whose second half
   carries the loss) of the bare float32 torch + PEFT loop, of fedlora's client path in float32,
   and of fedlora's client path in the default dtype (``model.dtype = auto``), alternating
   (:func:`fedlora.bench.overhead.alternate`); the speedup is bare float32 over the default.
2. The default side's achieved GFLOP/s against a measured matmul peak of its dtype: FLOPs of the
   products it runs per step (forward and input gradients through every linear layer,
   ``4 · params · tokens``, with the LM head only at the labelled positions).
3. The default run (``fedlora run``'s config) in float32 and in the default dtype: final held-out
   loss and wall seconds of each.
4. FLoRA's merge after 3 rounds in the default dtype: the update the server's model adds to
   ``W₀`` against ``Σ_t ΔW_t`` (float64), and what merging into the weights in the compute dtype,
   as before, would have held.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.bench.overhead import (
    StepBench,
    alternate,
    bare_loop,
    fedlora_client,
    synthetic_data,
)
from fedlora.config import RunConfig, TrainConfig, load_config
from fedlora.devices import HOST, synchronize
from fedlora.lora import dense_delta
from fedlora.models import load_configured, load_model, resolve_device
from fedlora.precision import dtype_name, resolve_dtype


@dataclass
class PrecisionBench(StepBench):
    """``dtype``: the default compute dtype on this machine (``model.dtype = auto``)."""

    bare_fp32_s_per_step: float
    fedlora_fp32_s_per_step: float
    fedlora_s_per_step: float
    speedup: float
    """``bare_fp32_s_per_step / fedlora_s_per_step``."""
    step_gflop: float
    """GFLOP of the products the default side runs per step."""
    achieved_gflops: float
    peak_gflops: float
    """Best of a square matmul in ``dtype`` on this machine."""
    peak_fp32_gflops: float
    loss_fp32: float
    loss_default: float
    run_fp32_s: float
    run_default_s: float
    flora_merge_rel_err: float
    """Largest over modules of ``‖U − Σ_t ΔW_t‖ / ‖Σ_t ΔW_t‖`` after 3 FLoRA rounds, ``U`` the
    accumulated update the server's forward pass adds to ``W₀`` (:class:`MergedBase`)."""
    flora_merged_in_dtype_rel_err: float
    """The same had every merge been rounded into the weights in ``dtype`` (the old path)."""
    torch_threads: int


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` ``(n, n) @ (n, n)`` products in ``dtype``."""
    a = torch.randn(n, n, device=HOST).to(device, dtype)
    b = torch.randn(n, n, device=HOST).to(device, dtype)

    def sync() -> None:
        synchronize(device)

    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def step_flops(model: Any, tokens: int, labelled: int) -> float:
    """FLOPs of forward and input gradients through every linear layer (``4 · params`` per
    token), the LM head counted only at the ``labelled`` positions whose logits are computed."""
    head = model.get_output_embeddings()
    inner = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    return 4.0 * float(inner * tokens + head.weight.numel() * labelled)


def run_precision_bench(
    workdir: Path,
    steps: int = 5,
    repeats: int = 3,
    batch_size: int = 4,
    seq_len: int = 64,
    rank: int = 8,
    overrides: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PrecisionBench:
    """``overrides``: ``--set`` items applied to the default config of every part (e.g. another
    ``model.name``)."""
    say = progress or (lambda _msg: None)
    base = list(overrides or [])
    default = load_config(None, base)
    per_step, gflop = time_steps(default, steps, repeats, batch_size, seq_len, rank, say)
    say("matmul peaks")
    device = resolve_device(default.model.device)
    dtype = resolve_dtype(default.model.dtype, device)
    peak, peak_fp32 = matmul_peak(dtype, device), matmul_peak(torch.float32, device)
    say("the default run in float32")
    loss_fp32, run_fp32 = _final_loss(
        load_config(None, [*base, "model.dtype=float32"]), workdir / "fp32"
    )
    say(f"the default run in {dtype_name(dtype)}")
    loss_default, run_default = _final_loss(default, workdir / "default")
    say(f"FLoRA's merge over 3 rounds in {dtype_name(dtype)}")
    merge_cfg = load_config(None, ["data.heldout=8", *base, "rounds=3", "strategy=flora"])
    merge = flora_merge_errors(merge_cfg, workdir / "merge")
    return PrecisionBench(
        model=default.model.name,
        dtype=dtype_name(dtype),
        steps=steps,
        repeats=repeats,
        batch_size=batch_size,
        seq_len=seq_len,
        rank=rank,
        bare_fp32_s_per_step=per_step["bare_fp32"],
        fedlora_fp32_s_per_step=per_step["fedlora_fp32"],
        fedlora_s_per_step=per_step["fedlora"],
        speedup=per_step["bare_fp32"] / per_step["fedlora"],
        step_gflop=gflop,
        achieved_gflops=gflop / per_step["fedlora"],
        peak_gflops=peak,
        peak_fp32_gflops=peak_fp32,
        loss_fp32=loss_fp32,
        loss_default=loss_default,
        run_fp32_s=run_fp32,
        run_default_s=run_default,
        flora_merge_rel_err=merge["held"],
        flora_merged_in_dtype_rel_err=merge["merged_in_dtype"],
        torch_threads=torch.get_num_threads(),
    )


def time_steps(
    default: RunConfig,
    steps: int,
    repeats: int,
    batch_size: int,
    seq_len: int,
    rank: int,
    say: Callable[[str], None],
) -> tuple[dict[str, float], float]:
    """Seconds per step of the three sides (``bare_fp32``, ``fedlora_fp32``, ``fedlora``) and
    the GFLOP per step of the default side; both models are freed on return."""
    m = default.model
    fp32 = load_model(m.name, device=m.device, dtype="float32")
    fast = load_configured(m, 0)
    pad_id = int(fp32.tokenizer.pad_token_id)
    data = synthetic_data(fp32.model.config.vocab_size, steps * batch_size, seq_len, seed=0)
    cfg = TrainConfig(lr=1e-4, steps=steps, batch_size=batch_size, max_grad_norm=1.0)
    say("warm-up")
    bare_loop(fp32.model, data, cfg, rank, pad_id, seed=0)
    fedlora_client(fast.model, data, cfg, rank, pad_id, seed=0)
    seconds = alternate(
        {
            "bare_fp32": lambda i: bare_loop(fp32.model, data, cfg, rank, pad_id, seed=i),
            "fedlora_fp32": lambda i: fedlora_client(fp32.model, data, cfg, rank, pad_id, i),
            "fedlora": lambda i: fedlora_client(fast.model, data, cfg, rank, pad_id, seed=i),
        },
        repeats,
        say,
    )
    labelled = batch_size * (seq_len - seq_len // 2)  # the second half carries the loss
    gflop = step_flops(fast.model, batch_size * seq_len, labelled) / 1e9
    return {k: v / steps for k, v in seconds.items()}, gflop


def _final_loss(cfg: RunConfig, out: Path) -> tuple[float, float]:
    from fedlora.experiment import run_experiment

    summary = run_experiment(cfg, out, progress=False)
    return float(summary["final"]), float(summary["seconds"])


def flora_merge_errors(cfg: RunConfig, workdir: Path) -> dict[str, float]:
    """Run FLoRA in-process for ``cfg.rounds`` rounds; the largest relative error over modules,
    against ``Σ_t ΔW_t`` in float64, of the update the server's model holds (``held``) and of
    merging every round into the weights in their own dtype (``merged_in_dtype``)."""
    from fedlora.checkpoint import take_deltas
    from fedlora.federation import build_federation
    from fedlora.simulation import Runner

    fed = build_federation(cfg)
    model = fed.loaded.model
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in fed.shapes}
    runner = Runner(fed, workdir, progress=False)
    snapshots: list[Any] = []
    runner.run(lambda record, snapshot: snapshots.append(snapshot))
    tensors, meta = snapshots[-1]
    merged_deltas = [take_deltas(tensors, f"merged/{i}") for i in range(int(meta["merged"]))]
    merged = runner.party.base
    worst = {"held": 0.0, "merged_in_dtype": 0.0}
    for name, weight in w0.items():
        deltas = [dense_delta(d[name], weight.device).float() for d in merged_deltas]
        total = torch.stack(deltas).double().sum(0)
        naive = weight.clone()  # what merging into the weight in its own dtype would hold
        for d in deltas:
            naive = (naive.float() + d).to(weight.dtype)
        term = merged.delta(name)
        held = {
            "held": term if term is not None else merged.master(name) - weight,
            "merged_in_dtype": naive.double() - weight.double(),
        }
        norm = float(torch.linalg.norm(total))
        for key, value in held.items():
            err = float(torch.linalg.norm(value.double() - total)) / norm
            worst[key] = max(worst[key], err)
    return worst


def format_precision(r: PrecisionBench) -> str:
    return "\n".join(
        [
            f"local training, {r.model}, batch {r.batch_size} x {r.seq_len} tokens, rank "
            f"{r.rank}, {r.steps} steps, median of {r.repeats}",
            f"bare torch + peft, float32:     {r.bare_fp32_s_per_step:.3f} s/step",
            f"fedlora client, float32:        {r.fedlora_fp32_s_per_step:.3f} s/step",
            f"fedlora client, {r.dtype} (default): {r.fedlora_s_per_step:.3f} s/step",
            f"speedup over the bare float32 loop: {r.speedup:.2f}x",
            f"achieved {r.achieved_gflops:.0f} GFLOP/s ({r.step_gflop:.1f} GFLOP per step) of a "
            f"{r.dtype} matmul peak of {r.peak_gflops:.0f} GFLOP/s "
            f"({r.achieved_gflops / r.peak_gflops:.0%}; float32 peak {r.peak_fp32_gflops:.0f})",
            f"default run: held-out loss {r.loss_fp32:.4f} in float32 ({r.run_fp32_s:.0f} s), "
            f"{r.loss_default:.4f} in {r.dtype} ({r.run_default_s:.0f} s); "
            f"difference {r.loss_default - r.loss_fp32:+.4f}",
            f"FLoRA's merge after 3 rounds in {r.dtype}: the update the model holds is off by "
            f"{r.flora_merge_rel_err:.2e} of the accumulated update; merged into {r.dtype} "
            f"weights (the old path) {r.flora_merged_in_dtype_rel_err:.2e}",
        ]
    )

"""The GPU validation in one command: ``fedlora bench gpu [--device cuda] [--json PATH]``.

Everything fedlora does on a device, checked on that device and written to one JSON file, within
about 8 minutes on one GPU:

- ``environment``: ``fedlora doctor``'s report;
- ``placement``: where the base weights, the adapter, the optimizer state and the merged float32
  terms live after a step (all on the device; the adapter and terms float32);
- ``strategies``: every method for 2 rounds on the tiny model, in float32 and in bfloat16;
- ``privacy``: client-level DP (clipping and noise) for 2 rounds;
- ``quantized``: 4-bit and 8-bit clients (bitsandbytes);
- ``parity``: FLoRA and FlexLoRA in float32 on the device against the same runs on the CPU
  (held-out loss and adapter);
- ``resume``: with ``model.deterministic``, a run stopped after round 1 and resumed gives the
  uninterrupted run's adapter bitwise;
- ``large``: an 8B-shaped random Llama (Llama-3-8B's shapes, built on the device, no download)
  training 3 LoRA steps of 4 × 512 tokens with gradient checkpointing: seconds per step and peak
  memory;
- ``flower``: Flower's simulation engine with the clients on the GPU;
- ``default_run``: ``make run``'s job on the device.

Each check runs on its own; one that fails records its error and the rest go on. ``--device
cpu`` runs it all on the CPU with reduced sizes (a 2-layer stand-in for the 8B model, 64 tokens;
``quick`` also leaves out the Flower and default runs), which is how CI keeps it working.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora import devices

CHECKS = (
    "environment",
    "placement",
    "strategies",
    "privacy",
    "quantized",
    "parity",
    "resume",
    "large",
    "flower",
    "default_run",
)
TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.toml"
EQUAL_RANKS = ("fedit", "fedex", "fedsa", "rolora")


@dataclass(frozen=True)
class Shape:
    """A Llama's size for the ``large`` check."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    tokens: int
    steps: int = 3


LLAMA_8B = Shape(4096, 14336, 32, 32, 8, 128256, batch=4, tokens=512)
"""Llama-3-8B's shapes."""
CPU_STAND_IN = Shape(256, 512, 2, 4, 2, 4096, batch=2, tokens=64, steps=2)


def run_gpu_validation(
    out: Path,
    device: str = "auto",
    quick: bool = False,
    only: Sequence[str] = (),
    strategies: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the checks (``only``: a subset of :data:`CHECKS`) on ``device``, with run folders
    under ``out``; the report (also written to ``out/gpu.json``). ``strategies``: the methods of
    the ``strategies`` check (default: all)."""
    say = progress or (lambda _msg: None)
    where = devices.resolve_device(device)
    chosen = [c for c in CHECKS if not only or c in only]
    if quick:
        chosen = [c for c in chosen if c not in ("flower", "default_run")]
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": str(where), "quick": quick, "checks": {}}
    for name in chosen:
        say(f"bench gpu: {name}")
        start = time.perf_counter()
        try:
            detail = _RUNNERS[name](where, out / name, strategies)
            ok = bool(detail.pop("ok", True))
            entry = {"ok": ok, **detail}
        except Exception as exc:  # one failed check must not hide the others
            lines = traceback.format_exception_only(type(exc), exc)
            entry = {"ok": False, "error": "".join(lines).strip()[-2000:]}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        report["checks"][name] = entry
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _environment(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    from fedlora.doctor import collect

    return {"report": collect()}


def _placement(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    """One training step and one merge on the device; where every tensor ended up."""
    from fedlora import adapters
    from fedlora.lora import LoRAFactors
    from fedlora.models import build_tiny
    from fedlora.precision import MergedBase
    from fedlora.scoring import mean_token_loss

    model, _tok = build_tiny(0, where, torch.bfloat16)
    peft_model = adapters.attach(model, ["q_proj", "v_proj"], 4, 8.0, seed=0)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 200, (2, 16), generator=devices.host_generator(0), device=devices.HOST)
    ids = ids.to(where)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    torch.autograd.backward(mean_token_loss(peft_model, batch))
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    model = adapters.detach(peft_model)
    base = MergedBase(model)
    name = "model.layers.0.self_attn.q_proj"
    gen = devices.host_generator(1)
    host = devices.HOST
    delta = LoRAFactors(
        A=torch.randn(2, 64, generator=gen, device=host),
        B=torch.randn(64, 2, generator=gen, device=host),
    )
    base.merge({name: delta})
    term = base.terms[name]
    assert isinstance(term, LoRAFactors)
    found = {
        "base": _where(p for p in model.parameters()),
        "adapter": _where(trainable),
        "optimizer_state": _where(state),
        "merged_term": _where([term.A, term.B]),
        "merged_master": _where([base.master(name)]),
    }
    dtypes = {
        "base": str(model.dtype),
        "adapter": str(trainable[0].dtype),
        "merged_term": str(term.A.dtype),
    }
    ok = all(v == [str(where)] for v in found.values()) and dtypes["adapter"] == "torch.float32"
    return {
        "ok": ok and dtypes["merged_term"] == "torch.float32",
        "devices": found,
        "dtypes": dtypes,
    }


def _where(tensors: Any) -> list[str]:
    return sorted({str(t.device) for t in tensors})


def _tiny_run(
    where: torch.device, folder: Path, *overrides: str, resume: bool = False
) -> dict[str, Any]:
    from fedlora.config import load_config
    from fedlora.experiment import resume_experiment, run_experiment

    if resume:
        return resume_experiment(folder, progress=False)
    cfg = load_config(TINY, [f"model.device={where}", "rounds=2", "train.steps=2", *overrides])
    shutil.rmtree(folder, ignore_errors=True)
    return run_experiment(cfg, folder, progress=False)


def _strategies(where: torch.device, folder: Path, names: Sequence[str]) -> dict[str, Any]:
    from fedlora.methods import REGISTRY

    results: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        for name in names or sorted(REGISTRY):
            ranks = ["clients.ranks=[4]"] if name in EQUAL_RANKS else []
            key = f"{name}/{dtype}"
            try:
                s = _tiny_run(
                    where, folder / key, f"strategy={name}", f"model.dtype={dtype}", *ranks
                )
                results[key] = {"ok": True, "final": s["final"], "device": s["device"]}
            except Exception as exc:
                results[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"ok": all(r["ok"] for r in results.values()), "runs": results}


def _privacy(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    s = _tiny_run(
        where,
        folder,
        "strategy=flexlora",
        "privacy.clip_norm=1.0",
        "privacy.noise_multiplier=0.5",
    )
    return {"final": s["final"], "epsilon_max": s["privacy"]["epsilon_max"]}


def _quantized(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for q in ("4bit", "8bit"):
        try:
            s = _tiny_run(where, folder / q, f'clients.quantization=["{q}"]')
            results[q] = {"ok": True, "final": s["final"]}
        except Exception as exc:
            results[q] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"ok": all(r["ok"] for r in results.values()), "runs": results}


def _parity(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    """FLoRA and FlexLoRA in float32 on the device and on the CPU: loss and adapter."""
    from fedlora.adapters import read_adapter

    results: dict[str, Any] = {}
    for name in ("flora", "flexlora"):
        runs = {}
        for label, dev in (("device", where), ("host", devices.HOST)):
            runs[label] = _tiny_run(dev, folder / name / label, f"strategy={name}")
        a = read_adapter(folder / name / "device" / "adapter")
        b = read_adapter(folder / name / "host" / "adapter")
        err = max(
            float(torch.linalg.norm(a[m].delta().double() - b[m].delta().double()))
            / float(torch.linalg.norm(b[m].delta().double()))
            for m in b
        )
        gap = abs(runs["device"]["final"] - runs["host"]["final"])
        # float32 kernels differ between devices in summation order: a few float32 roundings
        # per step, compounded over 2 rounds of training, stays far below 1e-3
        results[name] = {"loss_gap": gap, "adapter_rel_err": err, "ok": gap < 1e-3 and err < 1e-3}
    return {"ok": all(r["ok"] for r in results.values()), **results}


def _resume(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    """``model.deterministic``: a run killed (SIGKILL) during round 2 of 3 and resumed gives the
    uninterrupted run's adapter, bitwise."""
    from safetensors.torch import load_file

    from fedlora.checkpoint import FILE

    sets = [f"model.device={where}", "strategy=flexlora", "model.deterministic=true", "rounds=3"]
    whole, stopped = folder / "whole", folder / "stopped"
    _tiny_run(where, whole, *sets)
    shutil.rmtree(stopped, ignore_errors=True)
    argv = [sys.executable, "-m", "fedlora.cli", "run", str(TINY), "--quiet", "--out", str(stopped)]
    argv += [arg for s in [*sets, "train.steps=2"] for arg in ("--set", s)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        metrics = stopped / "metrics.jsonl"
        while proc.poll() is None and time.monotonic() < deadline:
            if (stopped / FILE).exists() and metrics.read_text().count("\n") >= 2:
                break  # round 1 is checkpointed: kill it during round 2
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_after = (stopped / "metrics.jsonl").read_text().count("\n") - 1
    _tiny_run(where, stopped, resume=True)
    torch.use_deterministic_algorithms(False)  # the setting is process-wide
    x = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    same = sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    return {"ok": same, "bitwise_equal": same, "killed_after_round": killed_after}


def _large(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    """An 8B-shaped Llama (a 2-layer stand-in on the CPU): LoRA steps with checkpointing."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fedlora import adapters
    from fedlora.precision import resolve_dtype
    from fedlora.scoring import mean_token_loss

    shape = LLAMA_8B if devices.is_cuda(where) else CPU_STAND_IN
    dtype = resolve_dtype("auto", where)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(shape.tokens, 128),
    )
    devices.reset_peak_memory(where)
    start = time.perf_counter()
    with where:  # built on the device in its dtype: no host copy, no float32 copy
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    build = time.perf_counter() - start
    peft_model = adapters.attach(model, ["q_proj", "v_proj"], 16, 32.0, seed=0)
    adapters.checkpoint_activations(peft_model)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    gen = devices.host_generator(0)
    size = (shape.batch, shape.tokens)
    seconds = []
    for _step in range(shape.steps):
        ids = torch.randint(0, shape.vocab, size, generator=gen, device=devices.HOST).to(where)
        devices.synchronize(where)
        t0 = time.perf_counter()
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        loss = mean_token_loss(peft_model, batch)
        torch.autograd.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        devices.synchronize(where)
        seconds.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {
        "shape": shape.__dict__,
        "parameters": params,
        "dtype": str(dtype),
        "build_seconds": round(build, 2),
        "seconds_per_step": [round(s, 3) for s in seconds],
        "peak_memory_mb": devices.peak_memory_mb(where),
    }


def _flower(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    from fedlora.config import load_config
    from fedlora.flower.launch import run_simulation

    cfg = load_config(TINY, [f"model.device={where}", "rounds=2", "train.steps=2"])
    shutil.rmtree(folder, ignore_errors=True)
    summary = run_simulation(cfg, folder, echo=False)
    trained_on = summary.get("client_devices", [])
    ok = bool(trained_on) and all(d.split(":")[0] == where.type for d in trained_on)
    return {"ok": ok, "client_devices": trained_on, "final": summary["final"]}


def _default_run(where: torch.device, folder: Path, _: Sequence[str]) -> dict[str, Any]:
    from fedlora.config import load_config
    from fedlora.experiment import run_experiment

    shutil.rmtree(folder, ignore_errors=True)
    cfg = load_config(None, [f"model.device={where}"])
    s = run_experiment(cfg, folder, progress=False)
    return {
        "base": s["base"],
        "final": s["final"],
        "dtype": s["dtype"],
        "seconds": s["seconds"],
        "peak_memory_mb": s["peak_memory_mb"],
    }


_RUNNERS: dict[str, Callable[[torch.device, Path, Sequence[str]], dict[str, Any]]] = {
    "environment": _environment,
    "placement": _placement,
    "strategies": _strategies,
    "privacy": _privacy,
    "quantized": _quantized,
    "parity": _parity,
    "resume": _resume,
    "large": _large,
    "flower": _flower,
    "default_run": _default_run,
}


def format_gpu(report: dict[str, Any]) -> str:
    lines = [f"fedlora bench gpu on {report['device']}", "", "| check | ok | seconds | |"]
    lines.append("|---|---|---|---|")
    for name, c in report["checks"].items():
        note = c.get("error", "").splitlines()[-1:] if not c["ok"] else []
        if name == "large" and c["ok"]:
            note = [f"{c['seconds_per_step']} s/step, peak {c['peak_memory_mb']} MiB"]
        lines.append(
            f"| {name} | {'yes' if c['ok'] else 'NO'} | {c['seconds']} | {''.join(note)} |"
        )
    return "\n".join(lines)

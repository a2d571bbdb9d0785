"""What large models on GPUs need, tested on the tiny model: gradient checkpointing, float16's
loss scaling, cross-entropy blocks sized for the device, peak memory per round, deterministic
kernels on request, loading straight onto the device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlora import adapters, devices, models
from fedlora.clients import Callbacks
from fedlora.config import TrainConfig, load_config
from fedlora.data import Example, collate, encode
from fedlora.experiment import run_experiment
from fedlora.models import build_tiny
from fedlora.scoring import block_rows, mean_token_loss
from fedlora.train import train_local

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
TARGETS = ["q_proj", "v_proj"]
EXAMPLES = [Example(prompt=f"what is {i} plus {i}", response=f"it is {2 * i}") for i in range(8)]


def _loss_and_grads(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward and backward of a LoRA on the tiny model; also how often layer 0 ran."""
    model, tokenizer = build_tiny(seed=0)
    peft_model = adapters.attach(model, TARGETS, rank=4, alpha=8.0, seed=1)
    if checkpointing:
        adapters.checkpoint_activations(peft_model)
    calls = []
    layer = model.model.layers[0].input_layernorm  # inside the checkpointed layer: recomputed
    handle = layer.register_forward_hook(lambda *_: calls.append(1))
    peft_model.train()
    batch = collate(encode(EXAMPLES, tokenizer, max_length=48), tokenizer.pad_token_id)
    loss = mean_token_loss(peft_model, batch)
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    adapters.detach(peft_model)
    return float(loss.detach()), grads, len(calls)


def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients() -> None:
    loss, grads, runs = _loss_and_grads(checkpointing=False)
    loss_c, grads_c, runs_c = _loss_and_grads(checkpointing=True)

    assert (runs, runs_c) == (1, 2)  # the layer ran again in the backward pass
    assert loss_c == loss
    assert grads.keys() == grads_c.keys() and grads
    for name, g in grads.items():  # the same kernels on the same inputs: float32-exact
        assert torch.allclose(grads_c[name], g, rtol=1e-6, atol=1e-9), name


def test_checkpointing_leaves_no_hook_behind_across_clients_and_rounds(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["model.gradient_checkpointing=true", "rounds=2", "train.steps=1"])
    seen: list[int] = []
    original = adapters.detach

    def counting_detach(peft_model: Any) -> Any:
        model = original(peft_model)
        seen.append(len(model.get_input_embeddings()._forward_hooks))
        assert not adapters._checkpointing(model)  # off between clients
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapters, "detach", counting_detach)
        run_experiment(cfg, tmp_path / "run", progress=False)

    assert len(seen) >= 6 and set(seen) == {0}  # 3 clients × 2 rounds, no hook stacked


def test_a_checkpointed_run_learns_what_the_plain_run_learns(tmp_path: Path) -> None:
    plain = run_experiment(load_config(TINY, ["rounds=1"]), tmp_path / "a", progress=False)
    cfg = load_config(TINY, ["rounds=1", "model.gradient_checkpointing=true"])
    checkpointed = run_experiment(cfg, tmp_path / "b", progress=False)

    assert checkpointed["final"] == pytest.approx(plain["final"], rel=1e-6)


def test_float16_training_scales_its_loss_and_skips_an_overflowing_step() -> None:
    model, tokenizer = build_tiny(seed=0, dtype=torch.float16)
    peft_model = adapters.attach(model, TARGETS, rank=4, alpha=8.0, seed=1)
    data = encode(EXAMPLES, tokenizer, max_length=48)
    calls = []

    def overflow_once() -> torch.Tensor:  # the first micro-batch's gradients overflow
        calls.append(1)
        first = next(p for p in peft_model.parameters() if p.requires_grad)
        return first.sum() * (float("inf") if len(calls) == 1 else 0.0)

    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4)
    result = train_local(
        peft_model, data, cfg, tokenizer.pad_token_id, 0, callbacks=Callbacks(penalty=overflow_once)
    )

    assert result.skipped_steps == 1
    factors = adapters.read_factors(peft_model)
    assert all(
        bool(torch.isfinite(f.A).all() and torch.isfinite(f.B).all()) for f in factors.values()
    )
    assert any(bool(f.B.abs().sum() > 0) for f in factors.values())  # later steps trained


def test_float32_and_bfloat16_train_without_a_scaler() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = build_tiny(seed=0, dtype=dtype)
        peft_model = adapters.attach(model, TARGETS, rank=2, alpha=4.0, seed=1)
        from fedlora.train import loss_scaler

        assert not loss_scaler(peft_model).is_enabled()
        adapters.detach(peft_model)


def test_cross_entropy_blocks_are_sized_for_the_device() -> None:
    cpu, cuda = devices.HOST, torch.device("cuda", 0)

    assert block_rows(49152, cpu) == 21  # 4 MB of float32: a CPU cache
    assert block_rows(128256, cpu) == 8
    assert block_rows(128256, cuda) == 523  # Llama 3's vocabulary: a few launches a step
    assert block_rows(10, cuda) == 2**26 // 10


def test_peak_memory_is_in_every_round_s_row_and_the_summary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plain = run_experiment(load_config(TINY, ["rounds=1"]), tmp_path / "cpu", progress=False)
    assert plain["peak_memory_mb"] is None  # no allocator statistics off CUDA

    peaks = iter([11.0, 42.0, 17.0])
    monkeypatch.setattr(devices, "peak_memory_mb", lambda device: next(peaks))
    resets: list[torch.device] = []
    monkeypatch.setattr(devices, "reset_peak_memory", resets.append)
    summary = run_experiment(load_config(TINY, ["rounds=2"]), tmp_path / "run", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("peak_memory_mb") for r in rows] == [None, 11.0, 42.0]
    assert summary["peak_memory_mb"] == 42.0
    assert len(resets) == 2 and all(d.type == "cpu" for d in resets)


def test_deterministic_kernels_are_switched_on_by_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = load_config(TINY, ["model.deterministic=true"])
    try:
        models.load_configured(cfg.model, seed=0)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert devices.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    models.load_configured(load_config(TINY).model, seed=0)
    assert not torch.are_deterministic_algorithms_enabled()  # the default stays fast


def test_a_saved_model_loads_straight_onto_its_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model, tokenizer = build_tiny(seed=0)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    seen: dict[str, Any] = {}
    original = models._from_pretrained

    def spy(source: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
        seen.update(kwargs, dtype=dtype)
        return original(source, dtype, **kwargs)

    monkeypatch.setattr(models, "_from_pretrained", spy)
    loaded = models.load_model(str(tmp_path / "m"), device="cpu", dtype="bfloat16")

    assert seen["device_map"] == "cpu" and seen["dtype"] == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}

"""Local training: seeded, only trainable parameters move, steps / epochs / accumulation."""

from __future__ import annotations

import torch

from fedlora import adapters
from fedlora.config import TrainConfig
from fedlora.data import Example, encode
from fedlora.models import build_tiny
from fedlora.train import num_steps, train_local

TARGETS = ["q_proj", "v_proj"]
EXAMPLES = [Example(prompt=f"what is {i} plus {i}", response=f"it is {2 * i}") for i in range(12)]


def trained(seed: int, cfg: TrainConfig, freeze_a: bool = False) -> tuple[dict, dict, float]:
    model, tokenizer = build_tiny(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = adapters.attach(model, TARGETS, rank=4, alpha=8.0, seed=1)
    if freeze_a:
        adapters.freeze_a(peft_model)
    before = adapters.read_factors(peft_model)
    data = encode(EXAMPLES, tokenizer, max_length=48)
    result = train_local(peft_model, data, cfg, tokenizer.pad_token_id, seed)
    after = adapters.read_factors(peft_model)
    plain = adapters.detach(peft_model)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, base[k]), f"base weight {k} changed"
    return before, after, result.loss


def test_training_is_seeded_and_moves_only_the_adapter() -> None:
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4)

    _, a, loss_a = trained(0, cfg)
    _, b, loss_b = trained(0, cfg)
    _, c, _ = trained(1, cfg)

    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(a[name].B, b[name].B) and loss_a == loss_b
    assert not torch.equal(a[name].B, c[name].B)
    assert torch.count_nonzero(a[name].B) > 0


def test_frozen_a_stays_bitwise_and_b_trains() -> None:
    before, after, _ = trained(0, TrainConfig(lr=1e-2, steps=2, batch_size=4), freeze_a=True)

    for name in before:
        assert torch.equal(before[name].A, after[name].A)
        assert not torch.equal(before[name].B, after[name].B)


def test_loss_goes_down_on_repeated_data() -> None:
    _, _, short = trained(0, TrainConfig(lr=1e-2, steps=1, batch_size=12))
    _, _, long = trained(0, TrainConfig(lr=1e-2, steps=15, batch_size=12))

    assert long < short


def test_epochs_and_accumulation_set_the_step_count() -> None:
    assert num_steps(TrainConfig(steps=7), 100) == 7
    assert num_steps(TrainConfig(epochs=1.0, batch_size=4, grad_accum=2), 100) == 13
    assert num_steps(TrainConfig(epochs=0.01, batch_size=4), 10) == 1

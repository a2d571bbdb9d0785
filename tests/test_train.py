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
        adapters.freeze(peft_model, "A")
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


# equal-length examples: a micro-batch's mean loss weighs every example alike, so two
# micro-batches of 2 accumulate exactly the gradient of one batch of 4
SAME_LENGTH = [Example(prompt=f"add {i} {i}", response=f"= {i + 10}") for i in range(1, 9)]


def trained_on(cfg: TrainConfig, examples: list[Example]) -> tuple[dict, dict, int]:
    model, tokenizer = build_tiny(seed=0)
    peft_model = adapters.attach(model, TARGETS, rank=4, alpha=8.0, seed=1)
    before = adapters.read_factors(peft_model)
    data = encode(examples, tokenizer, max_length=48)
    assert len({len(d.input_ids) for d in data}) == 1 or examples is not SAME_LENGTH
    result = train_local(peft_model, data, cfg, tokenizer.pad_token_id, 0)
    return before, adapters.read_factors(peft_model), result.examples_seen


def test_accumulated_micro_batches_make_the_step_of_their_whole_batch() -> None:
    whole = TrainConfig(lr=1e-2, steps=1, batch_size=4, max_grad_norm=None)
    halves = TrainConfig(lr=1e-2, steps=1, batch_size=2, grad_accum=2, max_grad_norm=None)

    _, a, seen_a = trained_on(whole, SAME_LENGTH)
    _, b, seen_b = trained_on(halves, SAME_LENGTH)
    _, c, _ = trained_on(
        TrainConfig(lr=1e-2, steps=1, batch_size=2, max_grad_norm=None), SAME_LENGTH
    )

    assert seen_a == seen_b == 4
    for name in a:
        assert torch.allclose(a[name].B, b[name].B, atol=1e-6)  # the same 4 examples, one step
        assert not torch.allclose(a[name].B, c[name].B, atol=1e-4)  # 2 examples differ


def test_gradient_clipping_bounds_the_step() -> None:
    # Adam divides by the gradient's size, but a gradient clipped far below its ε (1e-8) makes
    # a step of about lr · g / ε: nearly nothing moves
    free = TrainConfig(lr=1e-2, steps=1, batch_size=4, max_grad_norm=None)
    clipped = TrainConfig(lr=1e-2, steps=1, batch_size=4, max_grad_norm=1e-12)

    _, a, _ = trained_on(free, EXAMPLES)
    _, b, _ = trained_on(clipped, EXAMPLES)

    for name in a:
        assert float(b[name].B.abs().max()) < 1e-3 * float(a[name].B.abs().max())


def test_weight_decay_shrinks_the_trained_factors() -> None:
    # AdamW's decoupled decay: A ← A (1 − lr · wd) besides the Adam step (B starts at zero)
    plain = TrainConfig(lr=1e-2, steps=1, batch_size=4, weight_decay=0.0)
    decayed = TrainConfig(lr=1e-2, steps=1, batch_size=4, weight_decay=10.0)

    before, a, _ = trained_on(plain, EXAMPLES)
    _, b, _ = trained_on(decayed, EXAMPLES)

    for name in a:
        # the decay is exactly the difference: b = a − lr · wd · A₀ (the Adam steps are equal)
        A0 = before[name].A
        assert torch.allclose(b[name].A, a[name].A - 1e-2 * 10.0 * A0, atol=1e-5)

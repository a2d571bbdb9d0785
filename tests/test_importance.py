"""Importance: smoothed sensitivity by hand, per-component combination, tracking in training."""

from __future__ import annotations

import pytest
import torch

from fedlora import adapters
from fedlora.config import TrainConfig
from fedlora.data import Example, encode
from fedlora.importance import SmoothedSensitivity, component_scores
from fedlora.models import build_tiny
from fedlora.train import train_local


def test_smoothed_sensitivity_matches_a_hand_computed_example() -> None:
    # Prepare: w = [1, 2], g = [0.5, -1] → I = |w g| = [0.5, 2]; β1 = β2 = 0.5
    w, g = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    tracker = SmoothedSensitivity(beta1=0.5, beta2=0.5)

    # Execute / Assert, step 1: Ī = [0.25, 1], Ū = 0.5 |I − Ī| = [0.125, 0.5], S = Ī Ū
    tracker.update(w, g)
    assert tracker.score().tolist() == [[0.03125, 0.5]]

    # step 2: Ī = [0.375, 1.5], Ū = 0.5 [0.125, 0.5] + 0.5 [0.125, 0.5] = [0.125, 0.5]
    tracker.update(w, g)
    assert tracker.score().tolist() == [[0.046875, 0.75]]


def test_score_before_any_gradient_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no gradient seen yet"):
        SmoothedSensitivity().score()


def test_component_score_combines_the_row_of_a_and_the_column_of_b() -> None:
    score_A = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])  # row means: 2, 2
    score_B = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # column means: 2, 2

    assert component_scores(score_A, score_B).tolist() == [4.0, 4.0]
    assert component_scores(score_A * 2, score_B).tolist() == [6.0, 6.0]


def test_importance_is_tracked_during_local_training() -> None:
    model, tokenizer = build_tiny(seed=0)
    peft_model = adapters.attach(model, ["q_proj", "v_proj"], rank=4, alpha=8.0, seed=0)
    tracker = adapters.importance_tracker(peft_model)
    examples = [Example(prompt=f"say {i}", response=f"{i} {i} {i}") for i in range(8)]
    data = encode(examples, tokenizer, max_length=32)

    train_local(
        peft_model,
        data,
        TrainConfig(lr=1e-2, steps=3),
        tokenizer.pad_token_id,
        0,
        on_step=tracker.step,
    )

    scores = tracker.scores()
    assert set(scores) == set(adapters.lora_layers(peft_model))
    for s in scores.values():
        assert s.shape == (4,) and bool(torch.isfinite(s).all()) and bool((s >= 0).all())
    assert any(float(s.sum()) > 0 for s in scores.values())

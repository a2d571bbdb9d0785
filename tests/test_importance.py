"""Importance: smoothed sensitivity by hand, per-component combination, tracking in training."""

from __future__ import annotations

import pytest
import torch

from fedlora import adapters
from fedlora.clients import Callbacks
from fedlora.config import TrainConfig
from fedlora.data import Example, encode
from fedlora.importance import ComponentImportance, SmoothedSensitivity, component_scores
from fedlora.lora import LoRAFactors
from fedlora.methods import get_strategy
from fedlora.models import build_tiny
from fedlora.strategies import GlobalState
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


def test_components_of_different_importance_get_different_scores() -> None:
    # Prepare: r = 3. Row means of S_A: [2, 0, 5]; column means of S_B: [1, 3, 0]
    score_A = torch.tensor([[1.0, 3.0], [0.0, 0.0], [4.0, 6.0]])  # (r, d_in)
    score_B = torch.tensor([[0.0, 6.0, 0.0], [2.0, 0.0, 0.0]])  # (d_out, r)

    # Execute / Assert: s = [3, 3, 5], by hand; a broadcast global mean would give [4, 4, 4]
    assert component_scores(score_A, score_B).tolist() == [3.0, 3.0, 5.0]
    assert component_scores(score_A, score_B * 0).tolist() == [2.0, 0.0, 5.0]


def test_tracked_importance_picks_the_components_a_hand_computation_picks() -> None:
    # Prepare: one module, r = 3, d_in = d_out = 2, one step with hand-set gradients.
    # I = |w g| per entry; after one step with β1 = β2 = 0.85: Ī = 0.15 I, Ū = 0.15 · 0.85 I,
    # so S = c I² with c = 0.15² · 0.85.
    A = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.5, 0.5]]))  # (r, d_in)
    B = torch.nn.Parameter(torch.tensor([[1.0, 0.0, 3.0], [1.0, 0.0, 1.0]]))  # (d_out, r)
    A.grad = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])  # I_A = [[1,1],[4,0],[0,0]]
    B.grad = torch.tensor([[1.0, 5.0, 1.0], [1.0, 5.0, 1.0]])  # I_B = [[1,0,3],[1,0,1]]
    tracker = ComponentImportance({"m": lambda: (A, B)})

    # Execute
    tracker.step()
    scores = tracker.scores()["m"]

    # Assert: component i scores c (mean_j I_A[i,j]² + mean_j I_B[j,i]²)
    c = 0.15**2 * 0.85
    expected = [c * (1 + 1), c * (16 / 2 + 0), c * (0 + (9 + 1) / 2)]  # [2c, 8c, 5c]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)
    # HAFL truncation sends a rank-2 client the two most important: components 1 and 2
    state = GlobalState(
        factors={"m": LoRAFactors(A=A.detach(), B=B.detach())}, importance={"m": scores}
    )
    index = get_strategy("hafl-truncate").component_indices(state, 2)
    assert index is not None and index["m"].tolist() == [1, 2]


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
        callbacks=Callbacks(on_step=tracker.step),
    )

    scores = tracker.scores()
    assert set(scores) == set(adapters.lora_layers(peft_model))
    for s in scores.values():
        assert s.shape == (4,) and bool(torch.isfinite(s).all()) and bool((s >= 0).all())
    assert any(float(s.sum()) > 0 for s in scores.values())

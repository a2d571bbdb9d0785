"""HetLoRA: zero-padding weighted by each client's update norm."""

from __future__ import annotations

import pytest
import torch

from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.strategies import GlobalState, get_strategy


def test_weights_are_proportional_to_the_update_norm() -> None:
    # Prepare: ‖ΔW_a‖ = 1, ‖ΔW_b‖ = 3 → p = 1/4, 3/4 whatever the example counts
    a = LoRAFactors(A=torch.tensor([[1.0]]), B=torch.tensor([[1.0]]))
    b = LoRAFactors(A=torch.tensor([[1.0]]), B=torch.tensor([[3.0]]))
    updates = [ClientUpdate("a", {"m": a}, 100), ClientUpdate("b", {"m": b}, 1)]

    # Execute
    state = get_strategy("hetlora").aggregate(GlobalState(), updates)

    # Assert: B̄ = 1/4 · 1 + 3/4 · 3 = 2.5, Ā = 1
    assert state.factors["m"].B.item() == pytest.approx(2.5)
    assert state.factors["m"].A.item() == pytest.approx(1.0)


def test_all_zero_updates_fall_back_to_the_configured_weights() -> None:
    zero = LoRAFactors(A=torch.tensor([[1.0, 2.0]]), B=torch.zeros(1, 1))
    other = LoRAFactors(A=torch.tensor([[3.0, 6.0]]), B=torch.zeros(1, 1))
    updates = [ClientUpdate("a", {"m": zero}, 1), ClientUpdate("b", {"m": other}, 3)]

    state = get_strategy("hetlora").aggregate(GlobalState(), updates)

    assert state.factors["m"].A.flatten().tolist() == pytest.approx([2.5, 5.0])

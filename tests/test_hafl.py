"""HAFL's rank-1 aggregation: the mean over only the clients that updated each component."""

from __future__ import annotations

import pytest
import torch

from conftest import make_updates
from fedlora.errors import UpdateError
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.strategies import GlobalState


def ones(rank: int, value: float) -> LoRAFactors:
    return LoRAFactors(A=torch.full((rank, 2), value), B=torch.full((3, rank), value))


def test_components_only_high_rank_clients_hold_are_not_diluted() -> None:
    # Prepare: client a (rank 4, value 1) and client b (rank 2, value 3), equal weights
    updates = [ClientUpdate("a", {"m": ones(4, 1.0)}, 5), ClientUpdate("b", {"m": ones(2, 3.0)}, 5)]

    # Execute
    hafl = get_strategy("hafl").aggregate(GlobalState(), updates).factors["m"]
    zeropad = get_strategy("zeropad").aggregate(GlobalState(), updates).factors["m"]

    # Assert: components 0-1 are the mean of both (2.0); 2-3 are a's alone (1.0), where
    # zero-padding halves them (0.5)
    assert hafl.A[:, 0].tolist() == [2.0, 2.0, 1.0, 1.0]
    assert hafl.B[0].tolist() == [2.0, 2.0, 1.0, 1.0]
    assert zeropad.A[:, 0].tolist() == [2.0, 2.0, 0.5, 0.5]


def test_component_index_places_updates_and_untouched_components_keep_their_value() -> None:
    previous = GlobalState(factors={"m": ones(4, 7.0)}, round=3)
    update = ClientUpdate("a", {"m": ones(2, 1.0)}, 5, component_index={"m": torch.tensor([3, 1])})

    new = get_strategy("hafl").aggregate(previous, [update])

    assert new.factors["m"].A[:, 0].tolist() == [7.0, 1.0, 7.0, 1.0]
    assert new.round == 4


def test_with_every_component_updated_it_equals_zero_padding() -> None:
    updates = make_updates([4, 4, 4], seed=5)

    a = get_strategy("hafl").aggregate(GlobalState(), updates)
    b = get_strategy("zeropad").aggregate(GlobalState(), updates)

    for m in a.factors:
        assert torch.allclose(a.factors[m].A, b.factors[m].A, rtol=1e-6, atol=1e-7)
        assert torch.allclose(a.factors[m].B, b.factors[m].B, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "index",
    [
        torch.tensor([0, 0]),
        torch.tensor([-1, 2]),
        torch.tensor([0, 1, 2]),
        torch.tensor([0.0, 1.0]),
    ],
)
def test_bad_component_index_is_rejected(index: torch.Tensor) -> None:
    update = ClientUpdate("a", {"m": ones(2, 1.0)}, 5, component_index={"m": index})

    with pytest.raises(UpdateError, match="component_index") as err:
        get_strategy("hafl").aggregate(GlobalState(), [update])

    assert (err.value.client, err.value.module) == ("a", "m")


def test_server_importance_is_the_mean_over_clients_that_reported_each_component() -> None:
    # Prepare: a holds components 0-3 with scores 1..4, b holds 0-1 with scores 3, 3; equal weights
    a = ClientUpdate("a", {"m": ones(4, 1.0)}, 5, importance={"m": torch.tensor([1.0, 2, 3, 4])})
    b = ClientUpdate("b", {"m": ones(2, 1.0)}, 5, importance={"m": torch.tensor([3.0, 3])})

    # Execute
    state = get_strategy("hafl").aggregate(GlobalState(), [a, b])

    # Assert: [(1+3)/2, (2+3)/2, 3, 4]
    assert state.importance["m"].tolist() == [2.0, 2.5, 3.0, 4.0]


def test_unreported_components_keep_their_previous_importance() -> None:
    previous = GlobalState(factors={"m": ones(4, 1.0)}, importance={"m": torch.tensor([9.0] * 4)})
    update = ClientUpdate(
        "a",
        {"m": ones(1, 2.0)},
        5,
        component_index={"m": torch.tensor([2])},
        importance={"m": torch.tensor([0.5])},
    )

    state = get_strategy("hafl").aggregate(previous, [update])

    assert state.importance["m"].tolist() == [9.0, 9.0, 0.5, 9.0]


@pytest.mark.parametrize(
    "score", [torch.tensor([1.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")])]
)
def test_malformed_importance_is_rejected(score: torch.Tensor) -> None:
    update = ClientUpdate("a", {"m": ones(2, 1.0)}, 5, importance={"m": score})

    with pytest.raises(UpdateError, match="importance") as err:
        get_strategy("hafl").aggregate(GlobalState(), [update])

    assert (err.value.client, err.value.module) == ("a", "m")

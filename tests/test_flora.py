"""FLoRA: the stacked update equals Σ p_k s_k B_k A_k for any ranks, α and subset of clients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import exact_delta, make_updates, rel_err
from fedlora.lora import LoRAFactors
from fedlora.strategies import GlobalState, get_strategy
from fedlora.weighting import client_weights


@settings(max_examples=60, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 9), min_size=1, max_size=7),
    alphas=st.lists(st.floats(0.25, 128.0), min_size=7, max_size=7),
    d_out=st.integers(1, 24),
    d_in=st.integers(1, 24),
    subset_seed=st.integers(0, 2**16),
    weighting=st.sampled_from(["examples", "uniform", "given"]),
)
def test_stacking_reproduces_the_weighted_sum_of_updates(
    ranks: list[int],
    alphas: list[float],
    d_out: int,
    d_in: int,
    subset_seed: int,
    weighting: str,
) -> None:
    modules = {"m": (d_out, d_in)}
    updates = make_updates(ranks, seed=subset_seed, modules=modules, alphas=alphas)
    gen = torch.Generator().manual_seed(subset_seed)
    keep = torch.rand(len(updates), generator=gen) < 0.6
    keep[int(torch.randint(len(updates), (1,), generator=gen))] = True  # at least one
    subset = [u for u, k in zip(updates, keep.tolist(), strict=True) if k]
    w = {u.client_id: 1.0 + i for i, u in enumerate(updates)} if weighting == "given" else weighting
    strategy = get_strategy("flora", weighting=w)

    new = strategy.aggregate(GlobalState(), subset)

    ordered = sorted(subset, key=lambda u: u.client_id)
    expected = exact_delta(ordered, client_weights(ordered, w), "m")
    assert rel_err(new.global_delta("m"), expected) <= 1e-5


def test_hand_computed_two_clients() -> None:
    # Prepare: ΔW_1 = [[2]]·[[1]] = 2, ΔW_2 = [[4, 1]]·[[3], [1]] = 13; n = 1, 3 → p = 1/4, 3/4
    one = LoRAFactors(A=torch.tensor([[1.0]]), B=torch.tensor([[2.0]]))
    two = LoRAFactors(A=torch.tensor([[3.0], [1.0]]), B=torch.tensor([[4.0, 1.0]]))
    from fedlora.lora import ClientUpdate

    updates = [ClientUpdate("a", {"m": one}, 1), ClientUpdate("b", {"m": two}, 3)]

    # Execute
    delta = get_strategy("flora").aggregate(GlobalState(), updates).global_delta("m")

    # Assert: 1/4 · 2 + 3/4 · 13 = 10.25
    assert delta.item() == pytest.approx(10.25)


def test_stacked_rank_is_the_sum_of_participating_ranks_and_clients_start_fresh() -> None:
    modules = {"m": (64, 48)}
    updates = make_updates([8, 4, 2, 1], modules=modules)
    strategy = get_strategy("flora")

    new = strategy.aggregate(GlobalState(), [updates[0], updates[2]])

    delta = new.base_delta["m"]
    assert isinstance(delta, LoRAFactors) and delta.rank == 8 + 2
    assert not new.factors
    assert strategy.traits.merges_into_base and strategy.traits.fresh_client_adapters
    assert strategy.redistribute(new, [8, 4, 2, 1]) == [None, None, None, None]


def test_base_delta_is_dense_when_factors_would_be_larger() -> None:
    modules = {"m": (6, 5)}  # R (d_in + d_out) = 11 R >= 30 from R = 3
    updates = make_updates([2, 1], modules=modules)

    small = get_strategy("flora").aggregate(GlobalState(), updates[:1]).base_delta["m"]
    large = get_strategy("flora").aggregate(GlobalState(), updates).base_delta["m"]

    assert isinstance(small, LoRAFactors) and small.rank == 2
    assert isinstance(large, torch.Tensor) and large.shape == (6, 5)

"""FlexLoRA: the factored SVD matches a dense SVD; each client gets its rank's truncation."""

from __future__ import annotations

import pytest
import torch

from conftest import exact_delta, make_updates, rel_err
from fedlora.methods import get_strategy
from fedlora.strategies import GlobalState
from fedlora.weighting import client_weights

RANKS = [8, 4, 4, 2, 1]  # R = 19 < min(d) below


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(64, 48), (40, 96)])
def test_factored_svd_matches_dense_reference(seed: int, shape: tuple[int, int]) -> None:
    modules = {"m": shape}
    updates = make_updates(RANKS, seed=seed, modules=modules)
    strategy = get_strategy("flexlora")
    dense = exact_delta(updates, client_weights(updates), "m").float()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)

    new = strategy.aggregate(GlobalState(), updates)
    starts = strategy.redistribute(new, RANKS)

    factors = new.factors["m"]
    singular = torch.linalg.norm(factors.B, dim=0)  # B = U S, U orthonormal
    assert float((singular - S[: factors.rank]).abs().max() / S[0]) <= 1e-4
    for r, start in zip(RANKS, starts, strict=True):
        assert start is not None
        expected = (U[:, :r] * S[:r]) @ Vh[:r]
        assert rel_err(start["m"].delta(), expected) <= 1e-4


def test_nothing_is_lost_when_the_client_rank_covers_the_sum_of_ranks() -> None:
    updates = make_updates(RANKS, modules={"m": (64, 48)})
    strategy = get_strategy("flexlora")
    new = strategy.aggregate(GlobalState(), updates)
    total = sum(RANKS)

    (start,) = strategy.redistribute(new, [total + 5])

    assert start is not None and start["m"].rank == total
    expected = exact_delta(updates, client_weights(updates), "m")
    assert rel_err(start["m"].delta(), expected) <= 1e-5


def test_dense_route_when_sum_of_ranks_exceeds_the_module() -> None:
    updates = make_updates([6, 5], modules={"m": (7, 9)})  # R = 11 > min(d) = 7
    new = get_strategy("flexlora").aggregate(GlobalState(), updates)

    assert new.factors["m"].rank == 7
    expected = exact_delta(updates, client_weights(updates), "m")
    assert rel_err(new.global_delta("m"), expected) <= 1e-5


def test_truncation_is_the_best_approximation_of_its_rank() -> None:
    updates = make_updates(RANKS, modules={"m": (32, 32)}, seed=7)
    strategy = get_strategy("flexlora")
    new = strategy.aggregate(GlobalState(), updates)
    full = new.global_delta("m")
    S = torch.linalg.svdvals(full)

    (start,) = strategy.redistribute(new, [3])

    assert start is not None
    # Eckart–Young: the error of the best rank-3 approximation is sqrt(Σ_{i>3} σ_i²)
    err = torch.linalg.norm(full - start["m"].delta())
    assert float(err) == pytest.approx(float(torch.linalg.norm(S[3:])), rel=1e-4)

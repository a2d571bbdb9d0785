"""FedSVD: B averaged under the server's frozen A, then the product re-expressed in SVD form, A
orthonormal; the global update is exact and the SVD does not change it."""

from __future__ import annotations

import pytest
import torch

from conftest import MODULES, exact_delta, make_updates, rel_err, setup_round
from fedlora.config import load_config, options_of
from fedlora.errors import ConfigError, UpdateError
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.methods.fedsvd import FedSVDOptions
from fedlora.weighting import client_weights


def test_b_is_averaged_exactly_and_a_comes_back_orthonormal_with_the_product_kept() -> None:
    strategy, state, updates = setup_round("fedsvd", [4, 4, 4])
    weights = client_weights(updates)

    new = strategy.aggregate(state, updates)

    for m in MODULES:
        f = new.factors[m]
        assert f.rank == 4 and f.shape == state.factors[m].shape
        # the global update is Σ p_k B_k A, exactly (the SVD only re-expresses it)
        assert rel_err(f.delta(), exact_delta(updates, weights, m)) < 1e-5
        eye = torch.eye(4, dtype=torch.float64)
        assert torch.allclose(f.A.double() @ f.A.double().T, eye, atol=1e-5)  # A A^T = I
        norms = torch.linalg.norm(f.B.double(), dim=0)  # B = U S: columns by singular value
        assert torch.all(norms[:-1] >= norms[1:])
        assert not torch.allclose(f.A, state.factors[m].A)  # A moved: unlike FFA-LoRA's A_0


def test_the_official_codes_schedule_period_and_warmup_in_rounds() -> None:
    strategy = get_strategy("fedsvd", options=FedSVDOptions(period=2, warmup=2))
    # the code: (t + 1) % period == 0 and t + 1 > warmup, t + 1 the rounds done
    assert [strategy.reorthogonalises(done) for done in range(1, 7)] == [
        False, False, False, True, False, True,
    ]  # fmt: skip
    never = get_strategy("fedsvd", options=FedSVDOptions(period=0))
    assert not any(never.reorthogonalises(done) for done in range(1, 10))

    strategy, state, updates = setup_round("fedsvd", [4, 4], options=FedSVDOptions(period=2))
    first = strategy.aggregate(state, updates)  # round 1: no SVD, A is the server's
    for m in MODULES:
        assert torch.equal(first.factors[m].A, state.factors[m].A.to(first.factors[m].A.dtype))
    again = make_updates([4, 4], seed=5, shared=first)
    second = strategy.aggregate(first, again)  # round 2: the SVD
    for m in MODULES:
        A = second.factors[m].A.double()
        assert torch.allclose(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
        assert (
            rel_err(second.factors[m].delta(), exact_delta(again, client_weights(again), m)) < 1e-5
        )


def test_without_reorthogonalising_it_is_ffa_lora_at_equal_ranks() -> None:
    strategy, state, updates = setup_round("fedsvd", [4, 4, 4], options=FedSVDOptions(period=0))
    ffa = get_strategy("ffa")

    mine, theirs = strategy.aggregate(state, updates), ffa.aggregate(state, updates)

    for m in MODULES:
        assert torch.equal(mine.factors[m].A, theirs.factors[m].A)
        assert torch.equal(mine.factors[m].B, theirs.factors[m].B)


def test_an_update_that_moved_a_or_changed_rank_is_refused_naming_client_and_module() -> None:
    strategy, state, updates = setup_round("fedsvd", [4, 4])
    f = updates[1].factors["q_proj"]
    moved = ClientUpdate("c1", {**updates[1].factors, "q_proj": LoRAFactors(A=f.A + 0.1, B=f.B)}, 3)
    with pytest.raises(UpdateError, match=r"c1.*q_proj.*A differs from the server's A"):
        strategy.aggregate(state, [updates[0], moved])
    narrow = make_updates([2, 2], shared=state)
    with pytest.raises(UpdateError, match="every client trains the server's rank"):
        strategy.aggregate(state, narrow)


def test_its_options_are_a_config_section_checked_before_anything_runs() -> None:
    cfg = load_config(overrides=["strategy=fedsvd", "clients.ranks=[8]", "fedsvd.period=3"])
    assert options_of(cfg, FedSVDOptions) == FedSVDOptions(period=3, warmup=0)
    with pytest.raises(ConfigError, match=r"fedsvd\.period must be >= 0"):
        load_config(overrides=["strategy=fedsvd", "clients.ranks=[8]", "fedsvd.period=-1"])
    with pytest.raises(ConfigError, match="needs every client at the same rank"):
        load_config(overrides=["strategy=fedsvd", "clients.ranks=[8,4]"])

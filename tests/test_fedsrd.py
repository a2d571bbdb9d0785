"""FedSRD: clients send importance-sparsified deltas; the server reconstructs Σ p_k B_k A_k,
truncates it to rank r and carries the update by one factor, alternating B (odd rounds) and A
(even rounds), with a seeded DARE mask on the download."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import kurtosis

from conftest import MODULES, exact_delta, make_updates, setup_round
from fedlora.clients.base import LocalPlan, Upload
from fedlora.config import load_config, options_of
from fedlora.errors import ConfigError, UpdateError
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.methods.fedsrd import FedSRDOptions, SparseDeltaClient, drop_ratio, sparsify
from fedlora.weighting import client_weights

DENSE = FedSRDOptions(drop=0.0)


def rank_r_target(updates: list[ClientUpdate], module: str, r: int) -> torch.Tensor:
    """The rank-r truncated SVD of Σ p_k B_k A_k, densely in float64 (the code's way)."""
    W = exact_delta(updates, client_weights(updates), module)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_odd_rounds_move_b_by_the_pseudo_inverse_of_a_and_even_rounds_move_a() -> None:
    strategy, state, updates = setup_round("fedsrd", [4, 4, 4], options=DENSE)

    first = strategy.aggregate(state, updates)  # round 1: B moves, A is held

    for m in MODULES:
        held, new = state.factors[m], first.factors[m]
        assert torch.equal(new.A, held.A.to(new.A.dtype))
        A = held.A.double()
        target = rank_r_target(updates, m, 4)
        expected_B = held.B.double() + (target - held.B.double() @ A) @ torch.linalg.pinv(A)
        assert torch.allclose(new.B.double(), expected_B, atol=1e-5, rtol=1e-4)
        # A has full row rank, so A⁺ A projects onto its row space: B A is the target there
        projected = target @ torch.linalg.pinv(A) @ A
        assert torch.allclose(new.delta().double(), projected, atol=1e-5, rtol=1e-4)

    again = make_updates([4, 4, 4], seed=3)
    second = strategy.aggregate(first, again)  # round 2: A moves, B is held
    for m in MODULES:
        held, new = first.factors[m], second.factors[m]
        assert torch.equal(new.B, held.B)
        B = held.B.double()
        target = rank_r_target(again, m, 4)
        expected_A = held.A.double() + torch.linalg.pinv(B) @ (target - B @ held.A.double())
        assert torch.allclose(new.A.double(), expected_A, atol=1e-5, rtol=1e-4)


def test_without_the_svd_it_is_fedsrd_e_and_the_aggregate_is_not_truncated() -> None:
    options = FedSRDOptions(drop=0.0, svd=False)
    strategy, state, updates = setup_round("fedsrd", [2, 2, 2], options=options)

    new = strategy.aggregate(state, updates)

    for m in MODULES:
        A = state.factors[m].A.double()
        W = exact_delta(updates, client_weights(updates), m)  # rank up to 6, kept whole
        expected_B = W @ torch.linalg.pinv(A)  # B_g = 0 in round 1
        assert torch.allclose(new.factors[m].B.double(), expected_B, atol=1e-5, rtol=1e-4)
        truncated = rank_r_target(updates, m, 2) @ torch.linalg.pinv(A)
        assert not torch.allclose(new.factors[m].B.double(), truncated, atol=1e-3)


def test_a_round_in_which_every_client_returns_the_global_adapter_changes_nothing() -> None:
    strategy, state, updates = setup_round("fedsrd", [4, 4], options=DENSE)
    first = strategy.aggregate(state, updates)
    for options in (DENSE, FedSRDOptions()):  # dense, and the default DARE mask
        strategy = get_strategy("fedsrd", options=options)
        same = [ClientUpdate(u.client_id, dict(first.factors), u.num_examples) for u in updates]
        for done in (first, replace(first, round=2)):  # an odd and an even round
            new = strategy.aggregate(done, same)
            for m in MODULES:
                assert torch.allclose(new.factors[m].delta(), first.factors[m].delta(), atol=1e-5)


def test_the_download_mask_keeps_one_minus_drop_rescaled_and_is_the_same_on_a_rerun() -> None:
    strategy, state, updates = setup_round("fedsrd", [4, 4, 4], options=FedSRDOptions(drop=0.8))
    dense = get_strategy("fedsrd", options=DENSE).aggregate(state, updates)

    new = strategy.aggregate(state, updates)
    again = strategy.aggregate(state, updates)

    for m in MODULES:
        full = dense.factors[m].B  # B_g = 0 in round 1: B is the round's delta
        sparse = new.factors[m].B
        kept = sparse != 0
        assert 0.05 < kept.float().mean() < 0.4  # about 1 − drop = 0.2 of the entries
        assert torch.allclose(sparse[kept], full[kept] / 0.2, rtol=1e-5)
        assert torch.equal(sparse, again.factors[m].B)
    other = get_strategy("fedsrd", options=FedSRDOptions(drop=0.8, mask_seed=1))
    moved = other.aggregate(state, updates)
    assert not torch.equal(moved.factors["q_proj"].B, new.factors["q_proj"].B)


def test_the_drop_ratio_follows_the_kurtosis_of_the_scores_as_the_code_computes_it() -> None:
    options = FedSRDOptions()
    flat = torch.ones(100)  # no spread: κ taken as 1, ρ = base
    assert drop_ratio(flat, options) == pytest.approx(0.85)
    heavy = torch.cat([torch.zeros(999), torch.tensor([1000.0])])  # huge κ: capped
    assert drop_ratio(heavy, options) == pytest.approx(0.96)
    scores = torch.randn(50, 20, generator=torch.Generator().manual_seed(0)).abs() ** 3
    kappa = kurtosis(scores.flatten().numpy(), fisher=False)
    expected = 0.85 + min(0.11, 0.1 * math.log(max(kappa, 1.0)))
    assert drop_ratio(scores, options) == pytest.approx(expected, rel=1e-9)


def test_sparsify_keeps_the_most_important_entries_with_the_l1_mass() -> None:
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 30, generator=gen)
    scores = torch.rand(20, 30, generator=gen)
    options = FedSRDOptions()

    sparse = sparsify(delta, scores, options)

    kept = sparse != 0
    rho = drop_ratio(scores, options)
    assert kept.sum() == pytest.approx((1 - rho) * delta.numel(), abs=1)
    assert scores[kept].min() >= scores[~kept].max()  # the most important ones
    assert torch.allclose(sparse.abs().sum(), delta.abs().sum())
    ratio = sparse[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one common rescaling


def client(start: dict[str, LoRAFactors], options: FedSRDOptions) -> SparseDeltaClient:
    sent = {"base": options.base, "coeff": options.coeff, "upper": options.upper}
    plan = LocalPlan(rank=4, start=start, options=sent)
    return SparseDeltaClient(SimpleNamespace(plan=plan))  # type: ignore[arg-type]


def test_a_client_sends_its_start_plus_sparse_deltas_scored_by_the_other_factor() -> None:
    strategy, state, updates = setup_round("fedsrd", [4], options=DENSE)
    start = dict(strategy.aggregate(state, updates).factors)  # a nonzero B_g
    trained = make_updates([4], seed=7)[0].factors
    hook = client(start, FedSRDOptions())

    sent = hook.finish(Upload(dict(trained), {m: 4 for m in MODULES})).factors

    for m in MODULES:
        g, k = start[m], trained[m]
        dA, dB = sent[m].A - g.A, sent[m].B - g.B
        score_A = (k.A - g.A).abs() * torch.linalg.vector_norm(k.B, dim=0)[:, None]
        score_B = (k.B - g.B).abs() * torch.linalg.vector_norm(g.A, dim=1)[None, :]
        assert torch.allclose(dA, sparsify(k.A - g.A, score_A, FedSRDOptions()), atol=1e-6)
        assert torch.allclose(dB, sparsify(k.B - g.B, score_B, FedSRDOptions()), atol=1e-6)
        assert (dA != 0).float().mean() < 0.2 and (dB != 0).float().mean() < 0.2
    plan = hook.session.plan
    cost = SparseDeltaClient.upload_params(sent, plan)
    nonzero = sum(
        int(torch.count_nonzero(sent[m].A - start[m].A))
        + int(torch.count_nonzero(sent[m].B - start[m].B))
        for m in MODULES
    )
    bitmap = sum(math.ceil(t.numel() / 32) for m in MODULES for t in (start[m].A, start[m].B))
    assert cost == nonzero + bitmap
    dense = sum(f.A.numel() + f.B.numel() for f in sent.values())
    assert cost < dense / 3


def test_bad_options_and_updates_that_do_not_fit_are_refused() -> None:
    for key, value, message in [
        ("base", 1.0, "fedsrd.base must be in"),
        ("upper", 0.2, r"fedsrd.base \+ fedsrd.upper must be < 1"),
        ("drop", 1.0, "fedsrd.drop must be in"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["strategy=fedsrd", "clients.ranks=[4]", f"fedsrd.{key}={value}"])
    cfg = load_config(None, ["strategy=fedsrd", "clients.ranks=[4]", "fedsrd.drop=0.5"])
    assert options_of(cfg, FedSRDOptions).drop == 0.5
    with pytest.raises(ConfigError, match="needs every client at the same rank"):
        load_config(None, ["strategy=fedsrd", "clients.ranks=[8, 4]"])
    strategy, state, _ = setup_round("fedsrd", [4, 4])
    with pytest.raises(UpdateError, match="does not fit the server's adapter"):
        strategy.aggregate(state, make_updates([2, 2]))

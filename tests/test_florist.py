"""FLoRIST as its authors run it: each round's stacked update cut by energy to one pair, merged into
the base; clients start every round from fresh adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import MODULES, exact_delta, make_updates, rel_err
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.federation import strategy_of
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.methods.florist import FloristOptions, energy_rank
from fedlora.strategies import GlobalState
from fedlora.weighting import client_weights

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


@pytest.mark.parametrize(
    ("sigma", "tau", "rank"),
    [
        ([3.0, 2.0, 1.0], 0.6, 1),  # energies 9, 4, 1 of 14: 9/14 = 0.64 reaches 0.6
        ([3.0, 2.0, 1.0], 0.65, 2),  # 0.64 does not reach 0.65; 13/14 does
        ([3.0, 2.0, 1.0], 0.9, 2),
        ([3.0, 2.0, 1.0], 0.93, 3),  # 13/14 = 0.9286 < 0.93
        ([3.0, 2.0, 1.0], 1.0, 3),
        ([2.0, 0.0, 0.0], 1.0, 1),  # components without energy are never kept
        ([0.0, 0.0], 0.9, 1),  # nothing to keep: one (zero) component
    ],
)
def test_energy_rank_is_the_smallest_that_holds_tau_of_the_squared_values(
    sigma: list[float], tau: float, rank: int
) -> None:
    assert energy_rank(torch.tensor(sigma), tau) == rank


def _rank1(client: str, scale: float, row: int, n: int) -> ClientUpdate:
    """``ΔW = scale · e_row e_rowᵀ`` on every module, from ``n`` examples."""
    factors = {}
    for m, (d_out, d_in) in MODULES.items():
        B = torch.zeros(d_out, 1)
        A = torch.zeros(1, d_in)
        B[row, 0], A[0, row] = scale, 1.0
        factors[m] = LoRAFactors(A=A, B=B)
    return ClientUpdate(client, factors, n)


@pytest.mark.parametrize(("tau", "kept"), [(0.9, 1), (0.95, 2)])
def test_a_hand_example_keeps_exactly_the_components_tau_asks_for(tau: float, kept: int) -> None:
    # two equally weighted clients with orthogonal rank-1 updates: Σ p_k ΔW_k has singular values
    # 1.5 and 0.5, energies 2.25 and 0.25 of 2.5; τ = 0.9 keeps the first, τ = 0.95 both
    updates = [_rank1("c0", 3.0, 0, 10), _rank1("c1", 1.0, 1, 10)]
    strategy = get_strategy("florist", options=FloristOptions(tau=tau))

    state = strategy.aggregate(GlobalState(), updates)

    for m, (d_out, d_in) in MODULES.items():
        expected = torch.zeros(d_out, d_in)
        expected[0, 0] = 1.5
        if kept == 2:
            expected[1, 1] = 0.5
        delta = state.base_delta[m]
        assert isinstance(delta, LoRAFactors) and delta.rank == kept
        assert not state.factors  # nothing stays behind as a global adapter
        torch.testing.assert_close(state.global_delta(m), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [0.3, 0.7, 0.9, 0.99])
def test_the_global_pair_is_within_its_bound_and_the_smallest_that_is(tau: float) -> None:
    updates = make_updates([8, 4, 2, 2, 1], seed=3)
    weights = client_weights(updates)
    strategy = get_strategy("florist", options=FloristOptions(tau=tau))
    flex = get_strategy("flexlora").aggregate(GlobalState(), updates)

    state = strategy.aggregate(GlobalState(), updates)

    for m in MODULES:
        exact = exact_delta(updates, weights, m)
        full = flex.factors[m]
        p = energy_rank(torch.linalg.vector_norm(full.B, dim=0), tau)
        assert rel_err(state.global_delta(m), exact) <= (1 - tau) ** 0.5 + 1e-6
        # the same components as FlexLoRA's SVD, cut at p; one fewer would miss τ
        pair = state.base_delta[m]
        if isinstance(pair, LoRAFactors):  # held dense where that is smaller
            assert pair.rank == p
        torch.testing.assert_close(state.global_delta(m), full.B[:, :p] @ full.A[:p])
        if p > 1:
            shorter = flex.factors[m].B[:, : p - 1] @ flex.factors[m].A[: p - 1]
            assert rel_err(shorter, exact) > (1 - tau) ** 0.5


def test_tau_one_is_flexlora() -> None:
    updates = make_updates([8, 4, 2], seed=5)
    florist = get_strategy("florist", options=FloristOptions(tau=1.0))
    flex = get_strategy("flexlora")

    a = florist.aggregate(GlobalState(), updates)
    b = flex.aggregate(GlobalState(), updates)

    for m in MODULES:
        assert rel_err(a.global_delta(m), b.global_delta(m)) < 1e-6


def test_clients_start_every_round_from_fresh_adapters() -> None:
    strategy = get_strategy("florist", options=FloristOptions(tau=0.5))
    state = strategy.aggregate(GlobalState(), make_updates([8, 4, 2], seed=7))

    assert strategy.traits.merges_into_base and strategy.traits.fresh_client_adapters
    assert strategy.redistribute(state, [8, 4, 1]) == [None, None, None]


def _fresh(ranks: list[int], seed: int) -> list[ClientUpdate]:
    """What clients that learned nothing send back: a fresh adapter (``A`` random, ``B = 0``)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            f"c{k}",
            {
                m: LoRAFactors(A=torch.randn(r, d_in, generator=gen), B=torch.zeros(d_out, r))
                for m, (d_out, d_in) in MODULES.items()
            },
            10 + k,
        )
        for k, r in enumerate(ranks)
    ]


def _model(states: list[GlobalState], m: str) -> torch.Tensor:
    """The update a server holds after these rounds: every merged delta and the global adapter."""
    total = torch.zeros(MODULES[m], dtype=torch.float64)
    for s in states:
        total += s.global_delta(m).double() if s.base_delta else 0
    last = states[-1]
    return total + (last.factors[m].delta().double() if m in last.factors else 0)


def test_a_round_in_which_no_client_learns_leaves_the_model_unchanged() -> None:
    strategy = get_strategy("florist", options=FloristOptions(tau=0.9))
    ranks = [16, 8, 4, 2]
    first = strategy.aggregate(GlobalState(), make_updates(ranks, seed=1))
    starts = strategy.redistribute(first, ranks)
    # each client sends back exactly what it started from
    idle = [
        ClientUpdate(u.client_id, start, u.num_examples) if start else u
        for u, start in zip(_fresh(ranks, seed=2), starts, strict=True)
    ]

    second = strategy.aggregate(first, idle)

    for m in MODULES:
        before, after = _model([first], m), _model([first, second], m)
        assert float(torch.linalg.norm(after - before)) <= 1e-6 * float(torch.linalg.norm(before))


def test_the_accumulated_update_is_the_sum_of_each_round_s_thresholded_pair() -> None:
    tau = 0.8
    strategy = get_strategy("florist", options=FloristOptions(tau=tau))
    states, expected = [], {m: torch.zeros(MODULES[m], dtype=torch.float64) for m in MODULES}
    state = GlobalState()
    for t in range(3):
        updates = make_updates([8, 4, 2], seed=10 + t)
        weights = client_weights(updates)
        state = strategy.aggregate(state, updates)
        states.append(state)
        for m in MODULES:  # the round's exact sum, thresholded by a dense float64 SVD
            U, S, Vh = torch.linalg.svd(exact_delta(updates, weights, m))
            p = energy_rank(S, tau)
            expected[m] += (U[:, :p] * S[:p]) @ Vh[:p]

    assert state.round == 3
    for m in MODULES:
        assert rel_err(_model(states, m), expected[m]) < 1e-5


def test_tau_comes_from_the_config_on_either_engine_and_is_checked() -> None:
    cfg = load_config(TINY, ["strategy=florist", "florist.tau=0.5"])
    strategy = strategy_of(cfg)  # the one constructor both engines call
    assert strategy.options == FloristOptions(tau=0.5)  # type: ignore[attr-defined]
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=rf"florist.tau must be in \(0, 1\], got {bad}"):
            load_config(TINY, ["strategy=florist", f"florist.tau={bad}"])


def _traffic(tmp_path: Path, strategy: str, *extra: str) -> list[dict[str, int]]:
    overrides = [f"strategy={strategy}", "rounds=2", "clients.ranks=[8, 4]", *extra]
    run_experiment(load_config(TINY, overrides), tmp_path / strategy, progress=False)
    lines = (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line]
    return [t for r in rows if r["round"] > 0 for t in r["traffic"]]


@pytest.mark.runner
def test_a_tiny_run_downloads_less_than_flora(tmp_path: Path) -> None:
    florist = _traffic(tmp_path, "florist", "florist.tau=0.5")
    flora = _traffic(tmp_path, "flora")
    # uploads are the same adapters; after round 1, FLoRA sends every client the whole stack
    # (R = 20 components per module for the three clients), FLoRIST the round's pair, which
    # keeps half of the energy
    assert [r["up_params"] for r in florist] == [r["up_params"] for r in flora]
    assert len(florist) == 6  # 2 rounds × 3 clients
    for a, b in zip(florist[3:], flora[3:], strict=True):
        assert 0 < a["down_params"] < b["down_params"] / 4

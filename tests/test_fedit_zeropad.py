"""FedIT and zero-padding: hand-computed cases, FedIT's aggregation error, their equivalence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples, make_updates, rel_err
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import fedit_aggregation_error, get_strategy
from fedlora.strategies import GlobalState


def scalar_update(cid: str, a: float, b: float, n: int) -> ClientUpdate:
    return ClientUpdate(
        cid, {"m": LoRAFactors(A=torch.tensor([[float(a)]]), B=torch.tensor([[float(b)]]))}, n
    )


def test_fedit_averages_every_client_and_reports_its_error() -> None:
    # Prepare: (A, B) = (1, 2) with n = 1 and (3, 4) with n = 3 → p = 1/4, 3/4
    updates = [scalar_update("a", 1, 2, 1), scalar_update("b", 3, 4, 3)]

    # Execute
    state = get_strategy("fedit").aggregate(GlobalState(), updates)
    error = fedit_aggregation_error(updates)

    # Assert: Ā = 2.5, B̄ = 3.5, not client 0 times p_0 (the reference code's defect);
    # error = |3.5 · 2.5 − (1/4 · 2 + 3/4 · 12)| = 0.75
    assert state.factors["m"].A.item() == pytest.approx(2.5)
    assert state.factors["m"].B.item() == pytest.approx(3.5)
    assert error["m"] == pytest.approx(0.75)


def test_fedit_error_vanishes_for_one_or_identical_clients_only() -> None:
    updates = make_updates([4, 4, 4])
    same = [ClientUpdate(f"k{i}", updates[0].factors, 3 + i) for i in range(3)]

    assert all(e > 1e-3 for e in fedit_aggregation_error(updates).values())
    assert all(e < 1e-5 for e in fedit_aggregation_error(updates[:1]).values())
    assert all(e < 1e-5 for e in fedit_aggregation_error(same).values())


def test_fedit_error_matches_the_dense_computation() -> None:
    updates = make_updates([3, 3])
    state = get_strategy("fedit").aggregate(GlobalState(), updates)
    w = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]

    for m, err in fedit_aggregation_error(updates).items():
        exact = sum(p * u.factors[m].delta() for p, u in zip(w, updates, strict=True))
        dense = torch.linalg.norm(state.factors[m].delta() - exact)
        assert err == pytest.approx(float(dense), rel=1e-4)


def test_zeropad_hand_computed_mixed_ranks() -> None:
    # Prepare: rank 2 client (n = 1) and rank 1 client (n = 1); the second is padded with zeros
    big = LoRAFactors(A=torch.tensor([[1.0], [2.0]]), B=torch.tensor([[3.0, 4.0]]))
    small = LoRAFactors(A=torch.tensor([[5.0]]), B=torch.tensor([[6.0]]))
    updates = [ClientUpdate("a", {"m": big}, 1), ClientUpdate("b", {"m": small}, 1)]
    strategy = get_strategy("zeropad")

    # Execute
    state = strategy.aggregate(GlobalState(), updates)
    starts = strategy.redistribute(state, [2, 1])

    # Assert: A = [(1+5)/2, (2+0)/2], B = [(3+6)/2, (4+0)/2]; client b gets the first component
    assert state.factors["m"].A.flatten().tolist() == [3.0, 1.0]
    assert state.factors["m"].B.flatten().tolist() == [4.5, 2.0]
    assert starts[1] is not None and starts[1]["m"].A.flatten().tolist() == [3.0]


def test_fedit_refuses_to_hand_a_global_adapter_to_another_rank() -> None:
    strategy = get_strategy("fedit")
    state = strategy.aggregate(GlobalState(), make_updates([4, 4]))

    with pytest.raises(ValueError, match="needs equal ranks"):
        strategy.redistribute(state, [8])


@settings(max_examples=examples(30), deadline=None)
@given(rank=st.integers(1, 6), clients=st.integers(1, 5), seed=st.integers(0, 1000))
def test_zeropad_equals_fedit_at_equal_ranks(rank: int, clients: int, seed: int) -> None:
    updates = make_updates([rank] * clients, seed=seed)

    a = get_strategy("zeropad").aggregate(GlobalState(), updates)
    b = get_strategy("fedit").aggregate(GlobalState(), updates)

    for m in a.factors:
        assert torch.equal(a.factors[m].A, b.factors[m].A)
        assert torch.equal(a.factors[m].B, b.factors[m].B)
        assert rel_err(a.global_delta(m), b.global_delta(m)) == 0.0


def test_fedit_names_the_strategies_that_take_mixed_ranks() -> None:
    with pytest.raises(ValueError) as err:
        get_strategy("fedit").aggregate(GlobalState(), make_updates([4, 2]))
    assert str(err.value).endswith(
        " (use flora, flexlora, zeropad, hetlora, hafl or ffa for mixed ranks)"
    )


def test_fedit_reads_a_per_module_rank_and_refuses_a_wrong_one() -> None:
    strategy = get_strategy("fedit")
    state = strategy.aggregate(GlobalState(), make_updates([3, 3]))

    (start,) = strategy.redistribute(state, [{"q_proj": 3, "v_proj": 3}])
    assert start is not None and {f.rank for f in start.values()} == {3}
    with pytest.raises(ValueError, match="fedit: a client of rank 2 cannot start from the"):
        strategy.redistribute(state, [{"q_proj": 3, "v_proj": 2}])


def test_fedit_aggregation_error_follows_the_weighting() -> None:
    updates = make_updates([3, 3, 3], examples=[1, 10, 100])

    by_examples = fedit_aggregation_error(updates, "examples")
    uniform = fedit_aggregation_error(updates, "uniform")

    assert all(by_examples[m] != pytest.approx(uniform[m], rel=1e-3) for m in by_examples)

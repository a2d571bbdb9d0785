"""One table of invariants, run over every registered strategy."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import MODULES, exact_delta, make_updates, rel_err, setup_round
from fedlora.errors import UpdateError
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import REGISTRY, get_strategy
from fedlora.methods.florist import FloristOptions
from fedlora.strategies import GlobalState
from fedlora.weighting import client_weights

ALL = sorted(REGISTRY)
EXACT = {name for name, cls in REGISTRY.items() if cls.traits.exact == "always"}
"""Their global ΔW equals Σ p_k ΔW_k (what each method declares in its traits)."""
EXACT_AT_EQUAL_RANKS = {name for name, cls in REGISTRY.items() if cls.traits.exact == "equal_ranks"}
"""Their global ΔW equals Σ p_k ΔW_k when the clients share one rank; with mixed ranks each
component is averaged over the clients that hold it, which is not that sum."""
BOUNDED = {
    name: bound for name in REGISTRY if (bound := get_strategy(name).error_bound()) is not None
}
"""Their global ΔW is the exact sum truncated, within this relative error (and not closer)."""
PROJECTS = {name for name, cls in REGISTRY.items() if cls.traits.projects}
"""One factor carries each round's update: a client's update outside the held factor's span is
lost, so not even one client is reproduced."""
MIXED = [8, 4, 2, 2, 1]
EQUAL = [4, 4, 4]


def ranks_for(name: str) -> list[int]:
    return MIXED if REGISTRY[name].traits.mixed_ranks else EQUAL


def assert_states_equal(a: GlobalState, b: GlobalState) -> None:
    assert a.factors.keys() == b.factors.keys()
    assert a.base_delta.keys() == b.base_delta.keys()
    for name in a.factors:
        assert torch.equal(a.factors[name].A, b.factors[name].A)
        assert torch.equal(a.factors[name].B, b.factors[name].B)
    for name in a.base_delta:
        assert torch.equal(a.global_delta(name), b.global_delta(name))


def test_registry_holds_every_method_file_and_the_declared_promises() -> None:
    from pathlib import Path

    import fedlora.methods

    files = {p.stem for p in Path(fedlora.methods.__file__).parent.glob("*.py")} - {"__init__"}
    homes = {cls.__module__.rpartition(".")[2] for cls in REGISTRY.values()}
    assert homes == files  # every method file registers a strategy, and nothing else does
    assert {"flora", "flexlora", "ffa", "fedex"} <= EXACT and "fedit" not in EXACT
    assert "rolora" in EXACT_AT_EQUAL_RANKS and "florist" in BOUNDED
    assert BOUNDED["florist"] == pytest.approx((1 - FloristOptions().tau) ** 0.5)


@pytest.mark.parametrize("name", ALL)
def test_clients_start_round_one_from_one_shared_init(name: str) -> None:
    strategy = get_strategy(name)
    shapes = {m: (5, 3) for m in MODULES}
    state = strategy.init_state(shapes, 4, torch.Generator().manual_seed(0))
    again = strategy.init_state(shapes, 4, torch.Generator().manual_seed(0))

    narrow_rank = 2 if strategy.traits.mixed_ranks else 4
    starts = strategy.redistribute(state, [4, narrow_rank])

    if strategy.traits.fresh_client_adapters:
        assert starts == [None, None] and not state.factors
        return
    assert_states_equal(state, again)
    wide, narrow = starts
    assert wide is not None and narrow is not None
    for m in MODULES:
        assert torch.equal(narrow[m].A, wide[m].A[:narrow_rank]) and not narrow[m].A.eq(0).all()
        assert wide[m].B.eq(0).all()


@pytest.mark.parametrize("name", ALL)
def test_result_is_bitwise_independent_of_client_order(name: str) -> None:
    strategy, state, updates = setup_round(name, ranks_for(name))
    shuffled = updates[:]
    random.Random(3).shuffle(shuffled)
    assert [u.client_id for u in shuffled] != [u.client_id for u in updates]

    assert_states_equal(strategy.aggregate(state, updates), strategy.aggregate(state, shuffled))


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_not_mutated(name: str) -> None:
    strategy, state, updates = setup_round(name, ranks_for(name))
    before = [{m: (f.A.clone(), f.B.clone()) for m, f in u.factors.items()} for u in updates]

    strategy.aggregate(state, updates)

    for update, saved in zip(updates, before, strict=True):
        for m, (A, B) in saved.items():
            assert torch.equal(update.factors[m].A, A) and torch.equal(update.factors[m].B, B)


@pytest.mark.parametrize("name", ALL)
def test_mixed_ranks_are_accepted_exactly_when_the_strategy_says_so(name: str) -> None:
    strategy, state, updates = setup_round(name, MIXED)
    if strategy.traits.mixed_ranks:
        new = strategy.aggregate(state, updates)
        assert set(new.factors) | set(new.base_delta) == set(MODULES)
    else:
        with pytest.raises(UpdateError, match="same rank") as err:
            strategy.aggregate(state, updates)
        assert err.value.client == "c1" and err.value.module in MODULES


@pytest.mark.parametrize("name", ALL)
def test_one_client_is_reproduced(name: str) -> None:
    strategy, state, updates = setup_round(name, [4])

    new = strategy.aggregate(state, updates)

    errors = [rel_err(new.global_delta(m), updates[0].factors[m].delta()) for m in MODULES]
    if name in PROJECTS:
        assert min(errors) > 1e-3  # what it declares: the update is projected
    else:
        assert max(errors) < _tolerance(name)


def _tolerance(name: str) -> float:
    return BOUNDED.get(name, 0.0) + 1e-5


@pytest.mark.parametrize("name", ALL)
def test_identical_clients_are_reproduced(name: str) -> None:
    strategy, state, updates = setup_round(name, [4])
    copies = [ClientUpdate(f"k{i}", updates[0].factors, 5 + i) for i in range(3)]

    new = strategy.aggregate(state, copies)

    errors = [rel_err(new.global_delta(m), updates[0].factors[m].delta()) for m in MODULES]
    if name in PROJECTS:
        assert min(errors) > 1e-3
    else:
        assert max(errors) < _tolerance(name)


@pytest.mark.parametrize("name", ALL)
def test_exactness_is_what_the_method_promises(name: str) -> None:
    strategy, state, updates = setup_round(name, ranks_for(name))
    weights = client_weights(updates)

    new = strategy.aggregate(state, updates)

    errors = [rel_err(new.global_delta(m), exact_delta(updates, weights, m)) for m in MODULES]
    if name in EXACT_AT_EQUAL_RANKS:
        assert min(errors) > 1e-3  # mixed ranks
        strategy, state, updates = setup_round(name, EQUAL)
        new, weights = strategy.aggregate(state, updates), client_weights(updates)
        errors = [rel_err(new.global_delta(m), exact_delta(updates, weights, m)) for m in MODULES]
        assert max(errors) < 1e-5
    elif name in EXACT:
        assert max(errors) < 1e-5
    elif name in BOUNDED:  # truncated within its bound, but truncated
        assert min(errors) > 1e-3 and max(errors) < _tolerance(name)
    else:  # averaging factors (or weighting by norm) is not the mean of the products
        assert min(errors) > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_redistribution_fits_each_rank_and_is_computed_once_per_rank(name: str) -> None:
    strategy, state, updates = setup_round(name, ranks_for(name))
    new = strategy.aggregate(state, updates)
    ranks = ranks_for(name)

    starts = strategy.redistribute(new, ranks)

    assert len(starts) == len(ranks)
    if strategy.traits.fresh_client_adapters:
        assert all(s is None for s in starts)
        return
    for r, start in zip(ranks, starts, strict=True):
        assert start is not None and set(start) == set(MODULES)
        for m, f in start.items():
            assert f.shape == MODULES[m] and f.rank == min(r, new.factors[m].rank)
    for i, j in [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if i < j]:
        assert (starts[i] is starts[j]) == (ranks[i] == ranks[j])


@pytest.mark.parametrize("name", ALL)
def test_any_subset_of_clients_can_take_part(name: str) -> None:
    strategy, state, updates = setup_round(name, ranks_for(name))
    subset = [updates[2], updates[0]]

    new = strategy.aggregate(state, subset)

    assert new.round == state.round + 1
    weights = client_weights(sorted(subset, key=lambda u: u.client_id))
    if name in EXACT or (name in EXACT_AT_EQUAL_RANKS and len(set(ranks_for(name))) == 1):
        ordered = sorted(subset, key=lambda u: u.client_id)
        for m in MODULES:
            assert rel_err(new.global_delta(m), exact_delta(ordered, weights, m)) < 1e-5


def _poison(update: ClientUpdate, module: str, value: float, factor: str) -> ClientUpdate:
    f = update.factors[module]
    A, B = f.A.clone(), f.B.clone()
    (A if factor == "A" else B)[0, 0] = value
    return ClientUpdate(update.client_id, {**update.factors, module: LoRAFactors(A=A, B=B)}, 3)


def _reshape(update: ClientUpdate, module: str) -> ClientUpdate:
    f = update.factors[module]
    bad = LoRAFactors(A=torch.zeros(f.rank, f.d_in + 1), B=f.B)
    return ClientUpdate(update.client_id, {**update.factors, module: bad}, 3)


def _drop(update: ClientUpdate, module: str) -> ClientUpdate:
    kept = {m: f for m, f in update.factors.items() if m != module}
    return ClientUpdate(update.client_id, kept, 3)


def _examples(update: ClientUpdate, n: int) -> ClientUpdate:
    return ClientUpdate(update.client_id, update.factors, n)


BAD_INPUTS = {
    "nan": (lambda u: _poison(u, "v_proj", float("nan"), "B"), "NaN", "v_proj"),
    "inf": (lambda u: _poison(u, "v_proj", float("inf"), "A"), "NaN/Inf", "v_proj"),
    "missing module": (lambda u: _drop(u, "v_proj"), "missing \\['v_proj'\\]", None),
    "shape": (lambda u: _reshape(u, "q_proj"), "expected \\(12, 10\\)", "q_proj"),
    "zero examples": (lambda u: _examples(u, 0), "num_examples must be > 0", None),
    "negative examples": (lambda u: _examples(u, -4), "num_examples must be > 0", None),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("name", ALL)
def test_bad_update_is_rejected_naming_client_and_module(name: str, case: str) -> None:
    strategy, state, updates = setup_round(name, ranks_for(name))
    corrupt, message, module = BAD_INPUTS[case]
    updates[1] = corrupt(updates[1])

    with pytest.raises(UpdateError, match=message) as err:
        strategy.aggregate(state, updates)

    assert err.value.client == "c1"
    assert err.value.module == module
    assert "'c1'" in str(err.value)


@pytest.mark.parametrize("name", ALL)
def test_empty_client_list_and_duplicate_ids_are_rejected(name: str) -> None:
    strategy, state, updates = setup_round(name, ranks_for(name))

    with pytest.raises(UpdateError, match="empty"):
        strategy.aggregate(state, [])
    with pytest.raises(UpdateError, match="twice") as err:
        strategy.aggregate(state, [updates[0], updates[0]])
    assert err.value.client == "c0"


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("name", ALL)
def test_bad_given_weight_is_rejected_naming_the_client(name: str, weight: float) -> None:
    ranks = ranks_for(name)
    given = {f"c{k}": 1.0 for k in range(len(ranks))} | {"c2": weight}
    strategy, state, updates = setup_round(name, ranks, weighting=given)

    with pytest.raises(UpdateError, match="positive finite") as err:
        strategy.aggregate(state, updates)

    assert err.value.client == "c2"


@pytest.mark.parametrize("name", ALL)
def test_given_uniform_and_example_weights_differ_as_they_should(name: str) -> None:
    ranks = ranks_for(name)
    results = {}
    for weighting in ("examples", "uniform"):
        strategy, state, updates = setup_round(name, ranks, weighting=weighting)
        results[weighting] = strategy.aggregate(state, updates).global_delta("q_proj")
    explicit = {f"c{k}": 2.5 for k in range(len(ranks))}  # equal raw weights == uniform
    strategy, state, updates = setup_round(name, ranks, weighting=explicit)
    given = strategy.aggregate(state, updates).global_delta("q_proj")

    assert rel_err(given, results["uniform"]) < 1e-6
    if name != "hetlora":  # HetLoRA weighs by update norm, not by the configured weights
        assert rel_err(results["examples"], results["uniform"]) > 1e-4


def test_unknown_strategy_lists_the_available_ones() -> None:
    assert {"flora", "fedit", "hafl-freeze"} <= set(REGISTRY)
    with pytest.raises(ValueError, match="available: " + ", ".join(sorted(REGISTRY)) + "$"):
        get_strategy("fedavg")


def test_state_round_counts_rounds() -> None:
    strategy, state, _updates = setup_round("flora", MIXED)
    for expected in (1, 2, 3):
        state = strategy.aggregate(state, make_updates(MIXED, seed=expected))
        assert state.round == expected


def test_a_strategy_name_cannot_be_registered_twice() -> None:
    from fedlora.methods import REGISTRY
    from fedlora.methods.flora import FLoRA
    from fedlora.strategies.base import register

    assert REGISTRY["flora"] is FLoRA

    class Twin(FLoRA):
        name = "flora"

    with pytest.raises(ValueError, match="strategy name 'flora' registered twice"):
        register(Twin)
    assert REGISTRY["flora"] is FLoRA

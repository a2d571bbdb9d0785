"""RoLoRA: rounds alternate between training B (A frozen) and A (B frozen), each average exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import MODULES, exact_delta, make_updates, rel_err
from fedlora.config import load_config
from fedlora.errors import UpdateError
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy, hook_for
from fedlora.weighting import client_weights

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def _round(strategy, state, ranks, seed, frozen):  # type: ignore[no-untyped-def]
    """Updates that hold the state's ``frozen`` factor and a random other one."""
    raw = make_updates(ranks, seed)
    out = []
    for u in raw:
        factors = {}
        for m, f in u.factors.items():
            g = state.factors[m]
            A = g.A[: f.rank].clone() if frozen == "A" else f.A.to(g.A.dtype)
            B = g.B[:, : f.rank].clone() if frozen == "B" else f.B.to(g.B.dtype)
            factors[m] = LoRAFactors(A=A, B=B)
        out.append(ClientUpdate(u.client_id, factors, u.num_examples))
    return out


def test_rounds_alternate_and_each_average_is_exact_at_equal_ranks() -> None:
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 4, torch.Generator().manual_seed(0))
    assert strategy.client_options(state) == {"train": "B"}
    ranks = [4, 4, 4]

    first = _round(strategy, state, ranks, 1, frozen="A")
    after_b = strategy.aggregate(state, first)
    assert strategy.client_options(after_b) == {"train": "A"}
    for m in MODULES:  # A untouched, B averaged: the product is the weighted mean exactly
        assert torch.equal(after_b.factors[m].A, state.factors[m].A)
        weights = client_weights(first)
        assert rel_err(after_b.global_delta(m), exact_delta(first, weights, m)) < 1e-6

    second = _round(strategy, after_b, ranks, 2, frozen="B")
    after_a = strategy.aggregate(after_b, second)
    assert strategy.client_options(after_a) == {"train": "B"}
    for m in MODULES:
        assert torch.equal(after_a.factors[m].B, after_b.factors[m].B)
        weights = client_weights(second)
        assert rel_err(after_a.global_delta(m), exact_delta(second, weights, m)) < 1e-6


def test_with_mixed_ranks_each_component_is_averaged_over_the_clients_holding_it() -> None:
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 8, torch.Generator().manual_seed(0))
    updates = _round(strategy, state, [8, 4, 2], 1, frozen="A")
    weights = client_weights(updates)

    after = strategy.aggregate(state, updates)

    for m in MODULES:
        B = after.factors[m].B
        for i in range(8):
            holders = [
                (p, u.factors[m].B[:, i])
                for p, u in zip(weights, updates, strict=True)
                if i < u.factors[m].rank
            ]
            expected = sum(p * b for p, b in holders) / sum(p for p, _ in holders)
            torch.testing.assert_close(B[:, i], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("frozen", ["A", "B"])
@pytest.mark.parametrize("ranks", [[8, 2], [2], [8, 4, 2]])
def test_a_round_in_which_no_client_learns_leaves_the_model_unchanged(
    frozen: str, ranks: list[int]
) -> None:
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 8, torch.Generator().manual_seed(0))
    state = strategy.aggregate(state, _round(strategy, state, [8, 8], 1, frozen="A"))
    if frozen == "A":  # a B round again
        state = strategy.aggregate(state, _round(strategy, state, [8, 8], 2, frozen="B"))
    # every client sends back its start: the first r_k components of the global adapter
    idle = [
        ClientUpdate(
            f"c{k}",
            {
                m: LoRAFactors(A=f.A[:r].clone(), B=f.B[:, :r].clone())
                for m, f in state.factors.items()
            },
            10 + k,
        )
        for k, r in enumerate(ranks)
    ]

    after = strategy.aggregate(state, idle)

    for m in MODULES:
        # float32 rounding of the mean only (zero-padding moved [8, 2] by 0.43 of the norm)
        assert rel_err(after.global_delta(m), state.global_delta(m)) < 1e-6


def test_an_update_whose_frozen_factor_moved_is_rejected() -> None:
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 4, torch.Generator().manual_seed(0))
    moved = make_updates([4, 4], 3)  # random A: not the global A this B round holds frozen
    with pytest.raises(
        UpdateError, match="A differs from the global A; this RoLoRA round trains B"
    ):
        strategy.aggregate(state, moved)


def test_an_a_round_rejects_an_update_whose_b_moved() -> None:
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 4, torch.Generator().manual_seed(0))
    after_b = strategy.aggregate(state, _round(strategy, state, [4, 4], 1, frozen="A"))
    moved = _round(strategy, after_b, [4, 4], 2, frozen="A")  # B random: not the global B

    with pytest.raises(UpdateError) as err:
        strategy.aggregate(after_b, moved)

    assert (err.value.client, err.value.module) == ("c0", "q_proj")
    assert str(err.value) == (
        "client 'c0', module 'q_proj': B differs from the global B; this RoLoRA round trains A "
        "only (B frozen)"
    )


@pytest.mark.parametrize(
    ("ranks", "other", "message"),
    [
        (
            [8],
            False,
            "rank 8 and shape (12, 10) do not fit the global adapter of rank 4 and shape (12, 10)",
        ),
        ([4], True, "rank 4 and shape (12, 10) do not fit the global adapter"),
    ],
)
def test_an_update_that_does_not_fit_is_rejected_with_its_client_and_module(
    ranks: list[int], other: bool, message: str
) -> None:
    """A rank above the global one, or a module the global adapter lacks: the message names
    the client and module, and says what the global adapter holds where it has the module."""
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 4, torch.Generator().manual_seed(0))
    module = "o_proj" if other else "q_proj"
    modules = {"o_proj": MODULES["q_proj"]} if other else MODULES
    updates = make_updates(ranks, 5, modules=modules)

    with pytest.raises(UpdateError) as err:
        strategy.aggregate(state, updates)

    assert (err.value.client, err.value.module) == ("c0", module)
    assert str(err.value) == f"client 'c0', module '{module}': {message}"


@pytest.mark.parametrize(
    ("where", "eps", "accepted"),
    [("largest", 6, True), ("largest", 20, False), ("smallest", 3, True)],
)
def test_a_frozen_a_is_the_global_a_to_within_its_rounding_and_no_further(
    where: str, eps: int, accepted: bool
) -> None:
    """The tolerance is 4 eps (|A| + max |A|): 8 eps of max |A| at the largest element, still
    4 at the smallest (a kernel's rounding is relative to the row's scale, not to the element);
    20 eps at the largest is a moved A."""
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 4, torch.Generator().manual_seed(0))
    (update,) = _round(strategy, state, [4], 1, frozen="A")
    f = update.factors["v_proj"]
    A = f.A.clone()
    flat = A.abs().view(-1)
    i = int(flat.argmax() if where == "largest" else flat.argmin())
    A.view(-1)[i] += eps * torch.finfo(A.dtype).eps * float(A.abs().max())
    factors = {**update.factors, "v_proj": LoRAFactors(A, f.B)}

    if accepted:
        new = strategy.aggregate(state, [ClientUpdate("c0", factors, 3)])
        assert torch.equal(new.factors["v_proj"].A, state.factors["v_proj"].A)
    else:
        with pytest.raises(UpdateError, match="A differs from the global A"):
            strategy.aggregate(state, [ClientUpdate("c0", factors, 3)])


@pytest.mark.parametrize("frozen", ["A", "B"])
def test_float64_updates_give_a_float64_global_adapter(frozen: str) -> None:
    """From a float32 global adapter, in a B round (A frozen) and in an A round (B frozen)."""
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 4, torch.Generator().manual_seed(0))
    if frozen == "B":  # an A round follows a B round, all in float32
        state = strategy.aggregate(state, _round(strategy, state, [4, 2], 2, frozen="A"))
    assert all(f.A.dtype == torch.float32 for f in state.factors.values())
    updates = [
        ClientUpdate(u.client_id, {n: f.to(torch.float64) for n, f in u.factors.items()}, 5)
        for u in _round(strategy, state, [4, 2], 3, frozen=frozen)
    ]

    new = strategy.aggregate(state, updates)

    assert all(f.A.dtype == f.B.dtype == torch.float64 for f in new.factors.values())


def test_the_hook_trains_and_sends_the_planned_factor_only() -> None:
    hook = hook_for("rolora")
    assert hook.sent({"train": "A"}) == ("A",) and hook.sent({"train": "B"}) == ("B",)
    with pytest.raises(ValueError, match="'train' must be 'A' or 'B', got 'C'"):
        hook.sent({"train": "C"})


@pytest.mark.runner
def test_a_tiny_run_alternates_and_counts_only_the_trained_factor(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["strategy=rolora", "rounds=2", "clients.ranks=[4]"])
    run_experiment(cfg, tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line]
    up = [r["traffic"][0]["up_params"] for r in rows if r["round"] > 0]
    down = [r["traffic"][0]["down_params"] for r in rows if r["round"] > 0]
    # round 1 sends B (r · d_out per module), round 2 sends A (r · d_in): the tiny model's
    # q/v projections differ in d_out and d_in, so the two counts differ, and both are less
    # than the full adapter that comes down
    assert up[0] != up[1] and all(u < d for u, d in zip(up, down, strict=True))
    assert up[0] + up[1] == down[0]

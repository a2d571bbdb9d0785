"""RoLoRA: rounds alternate between training B (A frozen) and A (B frozen), each average exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import MODULES, exact_delta, make_updates, rel_err
from fedlora.clients import hook_for
from fedlora.config import load_config
from fedlora.errors import UpdateError
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.strategies import get_strategy
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
            A = g.A[: f.rank].clone() if frozen == "A" else f.A
            B = g.B[:, : f.rank].clone() if frozen == "B" else f.B
            factors[m] = LoRAFactors(A=A, B=B)
        out.append(ClientUpdate(u.client_id, factors, u.num_examples))
    return out


def test_rounds_alternate_and_each_average_is_exact_for_mixed_ranks() -> None:
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 8, torch.Generator().manual_seed(0))
    assert strategy.client_options(state) == {"train": "B"}
    ranks = [8, 4, 2]

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


def test_an_update_whose_frozen_factor_moved_is_rejected() -> None:
    strategy = get_strategy("rolora")
    state = strategy.init_state(MODULES, 4, torch.Generator().manual_seed(0))
    moved = make_updates([4, 4], 3)  # random A: not the global A this B round holds frozen
    with pytest.raises(
        UpdateError, match="A differs from the global A; this RoLoRA round trains B"
    ):
        strategy.aggregate(state, moved)


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

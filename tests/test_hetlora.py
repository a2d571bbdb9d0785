"""HetLoRA: zero-padding weighted by each client's update norm; rank self-pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora import adapters
from fedlora.config import load_config
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.methods.hetlora import norm_weights, pruned_rank, self_prune, tail_norm
from fedlora.models import build_tiny
from fedlora.strategies import GlobalState

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def test_weights_are_proportional_to_the_update_norm() -> None:
    # Prepare: ‖ΔW_a‖ = 1, ‖ΔW_b‖ = 3 → p = 1/4, 3/4 whatever the example counts
    a = LoRAFactors(A=torch.tensor([[1.0]]), B=torch.tensor([[1.0]]))
    b = LoRAFactors(A=torch.tensor([[1.0]]), B=torch.tensor([[3.0]]))
    updates = [ClientUpdate("a", {"m": a}, 100), ClientUpdate("b", {"m": b}, 1)]

    # Execute
    state = get_strategy("hetlora").aggregate(GlobalState(), updates)

    # Assert: B̄ = 1/4 · 1 + 3/4 · 3 = 2.5, Ā = 1
    assert state.factors["m"].B.item() == pytest.approx(2.5)
    assert state.factors["m"].A.item() == pytest.approx(1.0)
    assert norm_weights(updates, "m", [0.5, 0.5]) == pytest.approx([0.25, 0.75])


def test_all_zero_updates_fall_back_to_the_configured_weights() -> None:
    zero = LoRAFactors(A=torch.tensor([[1.0, 2.0]]), B=torch.zeros(1, 1))
    other = LoRAFactors(A=torch.tensor([[3.0, 6.0]]), B=torch.zeros(1, 1))
    updates = [ClientUpdate("a", {"m": zero}, 1), ClientUpdate("b", {"m": other}, 3)]

    state = get_strategy("hetlora").aggregate(GlobalState(), updates)

    assert state.factors["m"].A.flatten().tolist() == pytest.approx([2.5, 5.0])


# --- rank self-pruning ---------------------------------------------------------------------


def factors_with_tail(rank: int, tail_scale: float) -> dict[str, LoRAFactors]:
    A = torch.ones(rank, 3)
    B = torch.ones(2, rank)
    B[:, pruned_rank(rank, 0.5) :] *= tail_scale
    return {"m": LoRAFactors(A=A, B=B)}


def test_tail_norm_and_pruned_rank_by_hand() -> None:
    # rank 4, γ = 0.5 → keep 2, tail = components 2, 3:
    # B_tail is 2×2 of value 3 → ‖·‖ = 6; A_tail is 2×3 of ones → ‖·‖ = √6
    assert pruned_rank(4, 0.5) == 2 and pruned_rank(1, 0.5) == 1 and pruned_rank(10, 0.9) == 9
    assert tail_norm(factors_with_tail(4, 3.0), 0.5) == pytest.approx(6.0 * 6.0**0.5)


def test_a_client_prunes_when_its_tail_shrank_and_only_then() -> None:
    start = factors_with_tail(4, 1.0)

    shrank = self_prune(start, factors_with_tail(4, 0.1), 0.5)
    grew = self_prune(start, factors_with_tail(4, 2.0), 0.5)
    fresh = self_prune(None, factors_with_tail(4, 0.1), 0.5)

    assert shrank is not None and shrank["m"].rank == 2
    assert torch.equal(shrank["m"].B, factors_with_tail(4, 0.1)["m"].B[:, :2])
    assert grew is None and fresh is None
    assert self_prune(start, factors_with_tail(4, 1.0), 0.5) is None  # unchanged: not shrunk
    assert self_prune(factors_with_tail(1, 1.0), factors_with_tail(1, 0.1), 0.5) is None


def test_the_penalty_is_the_tail_norm_of_the_adapter() -> None:
    model = build_tiny(seed=0)[0]
    peft_model = adapters.attach(model, ["q_proj", "v_proj"], 4, 12.0, seed=1)
    for layer in adapters.lora_layers(peft_model).values():
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
    keep = {n: pruned_rank(4, 0.5) for n in adapters.lora_layers(peft_model)}

    value = float(adapters.tail_penalty(peft_model, keep)().detach())

    assert value == pytest.approx(tail_norm(adapters.read_factors(peft_model), 0.5), rel=1e-5)
    adapters.detach(peft_model)


@pytest.mark.runner
def test_a_strong_tail_penalty_prunes_ranks_that_stay_pruned(tmp_path: Path) -> None:
    # round 1 starts from B = 0 (tail norm 0): nothing can shrink. From round 2 a client whose
    # tail shrank below the one it received keeps ⌊0.9 r⌋ components, in later rounds too.
    cfg = load_config(TINY, ["strategy=hetlora", "rounds=3", "hetlora.reg=50.0"])

    run_experiment(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sums = [(r["rank_sum_before"], r["rank_sum_after"]) for r in rows[1:]]
    assert sums[0] == (14, 14.0)
    assert sums[1][0] == 14 and sums[1][1] < 14
    assert sums[2][0] == sums[1][1]
    per_rank = {t["client"]: t["up_params"] // t["rank"] for t in rows[1]["traffic"]}
    for round_2, round_3 in zip(rows[2]["traffic"], rows[3]["traffic"], strict=True):
        sent = round_2["up_params"] // per_rank[round_2["client"]]
        assert round_3["rank"] == sent  # the next round starts at the pruned rank
        assert sent in (round_2["rank"], pruned_rank(round_2["rank"], 0.9))


@pytest.mark.runner
def test_without_pruning_ranks_never_change(tmp_path: Path) -> None:
    cfg = load_config(
        TINY, ["strategy=hetlora", "rounds=3", "hetlora.reg=50.0", "hetlora.prune=false"]
    )

    run_experiment(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("rank_sum_after", 14) == 14 for r in rows[1:])

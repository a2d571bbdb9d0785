"""FLoRA: the stacked update equals Σ p_k s_k B_k A_k for any ranks, α and subset of clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import exact_delta, examples, make_updates, rel_err
from fedlora.lora import LoRAFactors
from fedlora.methods import get_strategy
from fedlora.strategies import GlobalState
from fedlora.weighting import client_weights


@settings(max_examples=examples(60), deadline=None)
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


@pytest.mark.runner
def test_a_dense_merged_update_is_merged_sent_counted_and_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: three rank-8 clients stack to R = 24. The tiny model's v_proj is 32 x 64, where
    # R (d_in + d_out) = 2304 > d_in d_out = 2048: dense, as the default model's v_proj
    # (192 x 576) is with FLoRA's ranks. Its q_proj (64 x 64: 3072 < 4096) stays factored.
    from fedlora import experiment
    from fedlora.checkpoint import load_checkpoint
    from fedlora.config import load_config
    from fedlora.experiment import resume_experiment, run_experiment

    tiny = Path(__file__).parent.parent / "configs" / "tiny.toml"
    cfg = load_config(tiny, ["clients.ranks=[8, 8, 8]", "rounds=3"])

    # Execute: a whole run, and one that stops after round 1 and resumes
    run_experiment(cfg, tmp_path / "whole", progress=False)
    save = experiment.save_checkpoint

    def stop_after_round_1(folder: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
        path = save(folder, tensors, meta)
        if meta["round"] == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(experiment, "save_checkpoint", stop_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False)
    tensors, _ = load_checkpoint(tmp_path / "cut")
    monkeypatch.setattr(experiment, "save_checkpoint", save)
    resume_experiment(tmp_path / "cut", progress=False)

    # Assert: v_proj's merged update is dense in the checkpoint, q_proj's factored
    v, q = "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj"
    assert tensors[f"merged/0/{v}/W"].shape == (32, 64)
    assert f"merged/0/{q}/A" in tensors and f"merged/0/{v}/A" not in tensors
    # each client downloads round 1's update in round 2: dense v (2 x 32 x 64), factored q
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    want = 2 * (32 * 64) + 2 * 24 * (64 + 64)
    assert {t["down_params"] for t in rows[2]["traffic"]} == {want}
    # the resumed run re-merged the dense update and ends where the whole run ended
    got = (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert got == (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [_timeless(r) for r in cut] == [_timeless(r) for r in rows]


def _timeless(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "seconds"}

"""Study 2: the computed traffic per strategy is what runs record, and Llama-7B's figures follow
from its shapes by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora import adapters
from fedlora.bench.comm import (
    LLAMA_7B_PARAMS,
    STRATEGIES,
    llama_7b_shapes,
    run_comm_study,
    traffic_summary,
)
from fedlora.config import load_config
from fedlora.experiment import run_experiment
from fedlora.models import load_model

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


@pytest.mark.parametrize("strategy", [*STRATEGIES, "flora-adalora"])
def test_the_computation_is_what_a_run_records(strategy: str, tmp_path: Path) -> None:
    ranks = [4, 4, 4] if strategy == "fedit" else [8, 4, 2]
    cfg = load_config(TINY, [f"strategy={strategy}", f"clients.ranks={ranks}", "rounds=3"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    loaded = load_model("tiny-llama")
    shapes = adapters.target_shapes(loaded.model, cfg.model.targets)
    params = sum(p.numel() for p in loaded.model.parameters())
    want = traffic_summary(strategy, shapes, ranks, 3, params)
    got = summary["communication"]
    if strategy == "flora-adalora":  # AdaLoRA's pruning only lowers what is sent
        assert got["up_params"] <= want["up_params"]
        assert got["down_params"] <= want["down_params"]
    else:
        assert (got["up_params"], got["down_params"]) == (want["up_params"], want["down_params"])
        assert got["ratio_to_full"] == pytest.approx(want["ratio_to_full"])


def test_llama_7b_figures_by_hand() -> None:
    shapes = llama_7b_shapes()
    assert len(shapes) == 64
    per_rank = 64 * (4096 + 4096)  # one rank of q_proj and v_proj in every layer
    fedit = traffic_summary("fedit", shapes, [16] * 10, 3, LLAMA_7B_PARAMS)
    assert fedit["up_params"] == fedit["down_params"] == 16 * per_rank
    assert fedit["ratio_to_full"] == pytest.approx(32 * per_rank / (2 * LLAMA_7B_PARAMS))
    ranks = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
    flora = traffic_summary("flora", shapes, ranks, 3, LLAMA_7B_PARAMS)
    assert flora["up_params"] == pytest.approx(16 * per_rank)  # the mean rank is 16
    assert flora["down_params"] == pytest.approx(2 / 3 * 160 * per_rank)  # none in round 1
    ffa = traffic_summary("ffa", shapes, ranks, 3, LLAMA_7B_PARAMS)
    assert ffa["up_params"] == ffa["down_params"] == pytest.approx(16 * 64 * 4096)


def test_the_study_writes_its_tables_and_checks_recorded_runs(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "v" / "flora" / "seed-0"
    cfg = load_config(TINY, ["rounds=2"])
    summary = run_experiment(cfg, run, progress=False)
    study = {
        "cells": [{"variant": "v", "strategy": "flora", "seed": 0,
                   "communication": summary["communication"]}],
        "configs": {"v/flora/seed-0": json.loads((run / "config.json").read_text())},
    }  # fmt: skip
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study))
    result = run_comm_study(tmp_path / "out", model="tiny-llama", checked_against=[path])
    assert [c["match"] for c in result["checked_runs"]] == [True]
    table = (tmp_path / "out" / "comm.md").read_text()
    assert "## Llama-7B" in table and "| homogeneous | fedit |" in table
    assert (tmp_path / "out" / "comm.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "comm.json").read_text())["paper"]["flora"] == 0.215

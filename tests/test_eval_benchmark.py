"""``eval.benchmark``: a second, fixed evaluation set scored with the held-out one (FLoRA trains
on instructions and scores MMLU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.config import load_config
from fedlora.data import load_examples
from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.federation import benchmark_of

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
MMLU = ["eval.benchmark=mmlu", "eval.benchmark_examples=12"]


def test_benchmark_metrics_are_reported_with_their_prefix_every_evaluation(tmp_path: Path) -> None:
    run_experiment(load_config(TINY, MMLU), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0.0 <= row["eval_mmlu_accuracy"] <= 1.0
        assert row["eval_mmlu_loss"] > 0 and "eval_loss" in row
        assert row["eval_mmlu_accuracy"] * 12 == pytest.approx(
            round(row["eval_mmlu_accuracy"] * 12)
        )


def test_the_benchmark_sample_is_the_same_for_every_seed() -> None:
    a = benchmark_of(load_config(TINY, [*MMLU, "seed=0"]))
    b = benchmark_of(load_config(TINY, [*MMLU, "seed=5"]))
    assert a is not None and b is not None
    assert a.name == "mmlu" and a.kind == "multiple-choice" and len(a.examples) == 12
    assert a.examples == b.examples
    assert benchmark_of(load_config(TINY)) is None


def test_the_training_source_is_not_a_benchmark() -> None:
    with pytest.raises(ConfigError, match=r"data\.heldout already scores"):
        load_config(TINY, ["eval.benchmark=chatterbot"])


# --- held-out categories: FlexLoRA's unseen tasks ---------------------------------------------

UNSEEN = ["data.heldout_categories=2", "data.limit=400"]


def test_held_out_categories_are_whole_and_no_client_trains_on_them() -> None:
    from fedlora.federation import federation_data

    cfg = load_config(TINY, UNSEEN)
    data = federation_data(cfg)
    [unseen] = data.scored
    assert unseen.name == "unseen" and unseen.rouge and unseen.kind == data.kind
    names = {e.category for e in unseen.examples}
    assert len(names) == 2
    seen = {e.category for p in data.parts for e in p} | {e.category for e in data.heldout}
    assert not names & seen  # neither trained on nor in the test split
    source, _ = load_examples("chatterbot", limit=400, seed=0)
    held_back = [e for e in source if e.category in names]
    assert len(held_back) >= len(unseen.examples)  # whole categories of the data, held back
    assert len(unseen.examples) <= cfg.data.heldout
    assert set(map(repr, unseen.examples)) <= set(map(repr, held_back))
    again = federation_data(load_config(TINY, UNSEEN))
    assert again.scored[0].examples == unseen.examples  # the same seed, the same categories
    other = federation_data(load_config(TINY, [*UNSEEN, "seed=3"])).scored[0]
    assert {e.category for e in other.examples} != names  # this seed holds back others
    assert federation_data(load_config(TINY)).scored == []
    with_validation = federation_data(load_config(TINY, [*UNSEEN, "data.validation=8"]))
    assert [b.name for b in with_validation.scored] == ["validation", "unseen"]
    assert with_validation.scored[1].examples == unseen.examples


def test_a_run_scores_the_held_out_categories_and_the_validation_split_as_their_own_sets(
    tmp_path: Path,
) -> None:
    sets = [*UNSEEN, "data.validation=8", "rounds=1", "eval.rouge_samples=2"]
    run_experiment(load_config(TINY, sets), tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        for name in ("unseen", "validation"):
            assert row[f"eval_{name}_loss"] > 0 and 0.0 <= row[f"eval_{name}_rougeL"] <= 1.0
        losses = {row["eval_loss"], row["eval_unseen_loss"], row["eval_validation_loss"]}
        assert len(losses) == 3  # three different sets
    assert summary["per_round"]["validation_loss"]["1"] == rows[1]["eval_validation_loss"]
    assert summary["eval_split"] == "heldout" and summary["heldout_examples"] == 16


def test_holding_back_every_category_is_refused() -> None:
    from fedlora.federation import federation_data

    with pytest.raises(ConfigError, match=r"data\.heldout_categories = 500, but the data has"):
        federation_data(load_config(TINY, ["data.heldout_categories=500"]))

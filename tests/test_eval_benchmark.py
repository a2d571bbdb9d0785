"""``eval.benchmark``: a second, fixed evaluation set scored with the held-out one (FLoRA trains
on instructions and scores MMLU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.config import load_config
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

"""``fedlora bench precision`` on the tiny model: every figure is there and the merge is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.bench.precision import (
    format_precision,
    matmul_peak,
    run_precision_bench,
    step_flops,
)
from fedlora.cli import main
from fedlora.models import build_tiny
from fedlora.precision import dtype_name, resolve_dtype

TINY = ["model.name=tiny-llama", "data.limit=60", "data.heldout=8", "model.max_length=32"]
TINY += ["train.steps=2", "train.lr=3e-3"]


def test_the_bench_measures_every_figure_on_the_tiny_model(tmp_path: Path) -> None:
    result = run_precision_bench(
        tmp_path, steps=2, repeats=1, batch_size=2, seq_len=16, overrides=TINY
    )

    assert result.dtype == dtype_name(resolve_dtype("auto", torch.device("cpu")))
    for figure in (result.bare_fp32_s_per_step, result.fedlora_s_per_step, result.peak_gflops):
        assert figure > 0
    assert result.speedup == pytest.approx(result.bare_fp32_s_per_step / result.fedlora_s_per_step)
    assert result.flora_merge_rel_err <= 1e-4
    if result.dtype == "bfloat16":  # merging into bfloat16 weights loses part of the update
        assert result.flora_merged_in_dtype_rel_err > 10 * result.flora_merge_rel_err
    assert abs(result.loss_default - result.loss_fp32) < 0.1
    text = format_precision(result)
    assert "speedup over the bare float32 loop" in text and "FLoRA's merge" in text


def test_step_flops_count_the_lm_head_only_where_the_loss_is() -> None:
    model, _ = build_tiny(seed=0)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight.numel()

    assert step_flops(model, tokens=10, labelled=10) == 4 * 10 * linear
    assert step_flops(model, tokens=10, labelled=3) == 4 * (10 * (linear - head) + 3 * head)


def test_matmul_peak_is_a_rate() -> None:
    assert 0 < matmul_peak(torch.float32, torch.device("cpu"), n=128, repeats=2) < 1e6


def test_the_command_writes_its_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "precision", "--steps", "1", "--repeats", "1", "--workdir", str(tmp_path)]
    argv += [item for key in TINY for item in ("--set", key)]
    argv += ["--json", str(tmp_path / "out.json")]

    assert main(argv) == 0

    figures = json.loads((tmp_path / "out.json").read_text())
    keys = {"bare_fp32_s_per_step", "fedlora_s_per_step", "speedup", "dtype", "achieved_gflops"}
    keys |= {"peak_gflops", "loss_fp32", "loss_default", "flora_merge_rel_err"}
    assert keys <= set(figures)
    assert "speedup over the bare float32 loop" in capsys.readouterr().out

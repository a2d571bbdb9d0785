"""The aggregation benchmark and its command line, on small shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.bench.aggregation import format_table, run_aggregation_bench
from fedlora.cli import main
from fedlora.methods import REGISTRY


def test_benchmark_times_every_strategy_and_checks_the_factored_svd() -> None:
    result = run_aggregation_bench(d_in=96, d_out=80, ranks=[16, 8, 4, 4], repeat=1)

    assert set(result.strategies) == set(REGISTRY)
    assert all(seconds > 0 for seconds in result.strategies.values())
    assert result.flexlora_dense_s > 0 and result.flexlora_factored_s > 0
    assert result.speedup == pytest.approx(result.flexlora_dense_s / result.flexlora_factored_s)
    assert 0 <= result.max_rel_err <= 1e-4
    # each float32 side against a float64 SVD: within float32's rounding on any CPU's kernels
    assert 0 < result.factored_vs_float64 <= 1e-4 and 0 < result.dense_vs_float64 <= 1e-4
    assert "against a float64 SVD" in format_table(result)
    assert "speedup" in format_table(result) and "fedit" in result.notes


def test_cli_writes_the_json_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "bench.json"

    code = main(
        [
            "bench",
            "aggregation",
            "--d-in",
            "64",
            "--d-out",
            "48",
            "--ranks",
            "8,4,2",
            "--repeat",
            "1",
            "--json",
            str(out),
        ]
    )

    assert code == 0
    figures = json.loads(out.read_text())
    for key in ("flexlora_dense_s", "flexlora_factored_s", "speedup", "max_rel_err", "strategies"):
        assert key in figures
    assert figures["ranks"] == [8, 4, 2] and set(figures["strategies"]) == set(REGISTRY)
    assert "max relative error" in capsys.readouterr().out


@pytest.mark.parametrize("ranks", ["8,x", "0,4", ""])
def test_cli_rejects_bad_ranks_with_a_clear_message(
    ranks: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "aggregation", "--ranks", ranks])

    assert exit_info.value.code == 2
    assert "--ranks" in capsys.readouterr().err


def test_cli_reports_an_unwritable_json_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    code = main(
        [
            "bench",
            "aggregation",
            "--d-in",
            "16",
            "--d-out",
            "16",
            "--ranks",
            "2,1",
            "--repeat",
            "1",
            "--json",
            str(blocker / "x.json"),
        ]
    )

    assert code == 2
    assert "cannot write" in capsys.readouterr().err

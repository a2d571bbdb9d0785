"""Study 5: ``fedlora bench scale`` measures both sides in their own processes and writes the
figures the issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.bench.scale import scaled
from fedlora.cli import main
from fedlora.config import load_config

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def test_scaled_config_samples_ten_of_the_registered() -> None:
    cfg = scaled(load_config(TINY), 1000)
    assert cfg.clients.num_clients == 1000 and cfg.clients.fraction == pytest.approx(0.01)


def test_bench_scale_writes_the_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figures.json"
    argv = ["bench", "scale", str(TINY), "--set", "rounds=2", "--set", "data.limit=5000"]
    argv += ["--json", str(out), "--out", str(tmp_path / "res"), "--workdir", str(tmp_path / "w")]
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    for key in ("rss_10", "rss_1000", "rss_ratio", "s_per_round_10", "s_per_round_1000"):
        assert figures[key] > 0, key
    assert figures["rss_ratio"] == pytest.approx(figures["rss_1000"] / figures["rss_10"])
    assert figures["rss_10"] > 100  # the whole process: torch and the model are in it
    rows = (tmp_path / "w" / "clients-1000" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [len(json.loads(r)["clients"]) for r in rows[1:]] == [10, 10]
    config = json.loads((tmp_path / "w" / "clients-1000" / "run" / "config.json").read_text())
    assert config["clients"]["num_clients"] == 1000
    assert (tmp_path / "res" / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert "rss_ratio" in capsys.readouterr().out


def test_too_little_data_for_full_batches_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "scale", str(TINY), "--set", "rounds=1", "--set", "data.limit=1100"]
    argv += ["--out", str(tmp_path / "res"), "--workdir", str(tmp_path / "w")]
    assert main(argv) != 0
    assert "fewer than a batch of 4" in capsys.readouterr().err


def test_scaled_config_samples_at_most_all_registered() -> None:
    assert scaled(load_config(TINY), 10, sampled=50).clients.fraction == 1.0
    assert scaled(load_config(TINY), 1000, sampled=50).clients.fraction == pytest.approx(0.05)


def test_bench_scale_on_flowers_simulation_engine(tmp_path: Path) -> None:
    """The Flower leg: a SuperNode per registered client (1,000 of them) in the simulation
    engine, the memory of every process of the run."""
    out = tmp_path / "figures.json"
    argv = ["bench", "scale", str(TINY), "--set", "rounds=1", "--set", "data.limit=5000"]
    argv += ["--engine", "flower", "--sampled", "20", "--json", str(out)]
    argv += ["--out", str(tmp_path / "res"), "--workdir", str(tmp_path / "w")]
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["engine"] == "flower" and figures["rss_ratio"] > 0
    # Ray, the SuperLink and the simulation process each import torch or Flower
    assert figures["rss_10"] > 500
    summary = json.loads((tmp_path / "w" / "clients-1000" / "run" / "summary.json").read_text())
    assert summary["engine"] == "flower" and len(summary["nodes"]) == 1000
    rows = (tmp_path / "w" / "clients-1000" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [len(json.loads(r)["clients"]) for r in rows[1:]] == [20]
    small = (tmp_path / "w" / "clients-10" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [len(json.loads(r)["clients"]) for r in small[1:]] == [10]

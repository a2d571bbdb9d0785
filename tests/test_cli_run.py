"""`fedlora run`, `fedlora compare` and `fedlora bench overhead` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")


def test_run_writes_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"

    code = main(["run", TINY, "--set", "rounds=1", "--out", str(out), "--quiet"])

    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"metric", "base", "final", "rounds"} <= set(summary)
    assert json.loads((out / "config.json").read_text())["rounds"] == 1
    assert "Headline metric" in capsys.readouterr().out


def test_bad_override_is_one_paragraph_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", TINY, "--set", "clients.nope=3", "--out", str(tmp_path / "x")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedlora: error: unknown config key 'clients.nope'")
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_compare_validates_every_strategy_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["compare", TINY, "--strategies", "flora,fedavg", "--out", str(tmp_path)])

    assert code == 2
    assert "strategy = 'fedavg' is not allowed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    code = main(["compare", TINY, "--strategies", "flora,fedit", "--out", str(tmp_path)])
    assert code == 2
    assert "'fedit' needs every client at the same rank" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_flower_refusals_come_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A single-party reference point on Flower is refused by ``run`` and by ``compare`` before
    a SuperLink starts or a folder is written."""
    out = tmp_path / "out"
    argv = ["compare", TINY, "--engine", "flower", "--strategies", "flora,centralized"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "'centralized' is a single-party reference point" in capsys.readouterr().err
    argv = ["run", TINY, "--engine", "flower", "--set", "strategy=standalone"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "'standalone' is a single-party reference point" in capsys.readouterr().err
    assert not out.exists()
    argv = ["compare", TINY, "--strategies", "flora", "--superlink", "127.0.0.1:9093"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "need --engine flower" in capsys.readouterr().err
    assert not out.exists()


def test_a_superlink_on_another_host_needs_tls_or_an_explicit_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["run", TINY, "--engine", "flower", "--superlink", "10.0.0.7:9093", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is another host and no --root-certificates were given" in err and "--insecure" in err
    both = [*argv, "--insecure", "--root-certificates", str(tmp_path / "ca.pem")]
    assert main(both) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["run", TINY, "--insecure", "--out", str(out)]) == 2
    assert "need --engine flower" in capsys.readouterr().err
    assert not out.exists()


def test_bench_overhead_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"

    code = main(
        [
            "bench",
            "overhead",
            "--model",
            "tiny-llama",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )

    figures = json.loads(out.read_text())
    assert code == 0
    assert figures["ratio"] == pytest.approx(
        figures["fedlora_s_per_step"] / figures["bare_s_per_step"]
    )
    assert figures["bare_s_per_step"] > 0

"""``fedlora bench gpu`` runs on the CPU (``--device cpu``, reduced sizes), so CI keeps the GPU
validation working for the session that has a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.bench.gpu import CHECKS, run_gpu_validation
from fedlora.cli import main


def test_the_validation_runs_on_the_cpu_and_writes_its_report(tmp_path: Path) -> None:
    only = ("placement", "strategies", "privacy", "parity", "large")
    report = run_gpu_validation(
        tmp_path, device="cpu", quick=True, only=only, strategies=("flora", "hafl-freeze")
    )

    assert report == json.loads((tmp_path / "gpu.json").read_text())
    assert list(report["checks"]) == list(only) and report["device"] == "cpu"
    checks = report["checks"]
    assert all(c["ok"] for c in checks.values()), {k: c.get("error") for k, c in checks.items()}
    assert checks["placement"]["devices"]["optimizer_state"] == ["cpu"]
    assert checks["placement"]["dtypes"]["merged_term"] == "torch.float32"
    assert sorted(checks["strategies"]["runs"]) == [
        "flora/bfloat16",
        "flora/float32",
        "hafl-freeze/bfloat16",
        "hafl-freeze/float32",
    ]
    assert checks["parity"]["flora"]["adapter_rel_err"] == 0.0  # the CPU against itself
    assert len(checks["large"]["seconds_per_step"]) == 2


def test_a_failing_check_is_recorded_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fedlora.bench import gpu

    def broken(*_: object) -> dict[str, object]:
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(gpu._RUNNERS, "placement", broken)
    report = run_gpu_validation(tmp_path, device="cpu", only=("placement", "environment"))

    assert report["ok"] is False
    assert report["checks"]["placement"] == {
        "ok": False,
        "error": "RuntimeError: no such kernel",
        "seconds": report["checks"]["placement"]["seconds"],
    }
    assert report["checks"]["environment"]["ok"]


def test_the_command_names_an_unknown_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "gpu", "--device", "cpu", "--only", "placement,warp"]) == 2
    assert "warp" in capsys.readouterr().err and "placement" in ",".join(CHECKS)

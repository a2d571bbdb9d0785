"""``log = ["tensorboard"]`` (``--log tensorboard``): every per-round figure of metrics.jsonl as a
TensorBoard scalar, read back here with TensorBoard's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import resume_experiment, run_experiment
from fedlora.report import TensorBoardLog

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_every_per_round_figure_is_a_scalar_at_its_round(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["run", str(TINY), "--set", "rounds=2", "--set", "data.validation=8", "--quiet"]
    assert main([*argv, "--out", str(out), "--log", "tensorboard"]) == 0
    assert json.loads((out / "config.json").read_text())["log"] == ["tensorboard"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(out / "tensorboard")
    for row in rows:
        t = row["round"]
        assert scalars["eval/loss"][t] == pytest.approx(row["eval_loss"], rel=1e-6)
        assert scalars["eval/validation_loss"][t] == pytest.approx(
            row["eval_validation_loss"], rel=1e-6
        )
        if t > 0:
            assert scalars["train/loss"][t] == pytest.approx(row["train_loss"], rel=1e-6)
            up = sum(c["up_bytes"] for c in row["traffic"])
            assert scalars["comm/up_bytes"][t] == up > 0
            assert scalars["round/seconds"][t] == pytest.approx(row["seconds"], rel=1e-6)
    assert sorted(scalars["eval/loss"]) == [0, 1, 2]


def test_a_resumed_run_rewrites_its_log_from_the_rounds_it_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(TINY, ["rounds=2", 'log=["tensorboard"]'])
    run_experiment(cfg, out, progress=False)
    before = read_scalars(out / "tensorboard")
    resume_experiment(out, progress=False)  # finished: it rewrites from the checkpoint's rows
    after = read_scalars(out / "tensorboard")
    assert {k: sorted(v) for k, v in after.items()} == {k: sorted(v) for k, v in before.items()}
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file, no duplicates


def test_scalars_skip_what_is_not_a_number() -> None:
    row = {"round": 3, "eval_rougeL": 0.5, "train_loss": None, "clients": ["a"], "failed": True}
    assert TensorBoardLog.scalars(row) == {"eval/rougeL": 0.5}


def test_an_unknown_logger_is_refused_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"log = 'wandb' is not allowed; choose one of tensorboard"
    ):
        load_config(TINY, ['log=["wandb"]'])


def test_a_missing_tensorboard_package_is_named_before_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(
        ConfigError, match=r"needs the package tensorboard: pip install 'fedlora\[tensorboard\]'"
    ):
        load_config(TINY, ['log=["tensorboard"]'])

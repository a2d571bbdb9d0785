"""Checkpoints after every round; a run killed at any moment resumes to the same result."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora import experiment
from fedlora.checkpoint import FILE, load_checkpoint, save_checkpoint
from fedlora.cli import main
from fedlora.config import RunConfig, load_config
from fedlora.errors import ConfigError
from fedlora.experiment import resume_experiment, run_experiment

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def tiny(**overrides: object) -> RunConfig:
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def rows(out: Path) -> list[dict[str, object]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def assert_same_adapter(a: Path, b: Path) -> None:
    x = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert sorted(x) == sorted(y)
    assert all(torch.equal(x[k], y[k]) for k in x)  # bitwise on CPU


def test_sigkill_at_a_random_moment_then_resume_gives_the_same_run(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    run_experiment(tiny(rounds=6), tmp_path / "whole", progress=False)
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    rounds_took = sum(json.loads(x).get("seconds", 0.0) for x in lines[1:])
    # within the first 60 % of the 6 rounds' time, so that some rounds are always left to resume
    delay = random.Random(seed).uniform(0.0, 0.6 * rounds_took)
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "fedlora.cli", "run", str(TINY), "--set", "rounds=6"]
    proc = subprocess.Popen([*argv, "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the first checkpoint (round 0) marks a resumable run
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = len(rows(out))
    msg = f"killed {delay:.2f} s after the first checkpoint (seed {seed}), {done} rows written"
    assert proc.returncode == -signal.SIGKILL and done < 7, msg

    resume_experiment(out, progress=False)

    assert rows(out) == rows(tmp_path / "whole"), msg
    assert_same_adapter(out, tmp_path / "whole")


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    ("strategy", "dtype"),
    [
        ("hafl-truncate", "float32"),
        ("hetlora", "float32"),
        ("flexlora", "float32"),
        ("flora", "float32"),
        ("centralized", "float32"),
        ("standalone", "float32"),
        # bfloat16: the resumed server re-merges FLoRA's updates into float32 masters of its
        # pristine bfloat16 base, and so holds the uninterrupted run's weights bitwise
        ("flora", "bfloat16"),
        ("flexlora", "bfloat16"),
    ],
)
def test_a_crash_after_any_round_resumes_to_the_same_run(
    strategy: str, dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(
        strategy=strategy,
        rounds=3,
        **{"clients.ranks": "[8, 4, 2]", "clients.fraction": 0.67, "model.dtype": dtype},
    )
    run_experiment(cfg, tmp_path / "whole", progress=False)
    save = experiment.save_checkpoint
    crash_after = 1 if strategy != "flora" else 2

    def crashing(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> Path:
        path = save(folder, tensors, meta)
        if meta["round"] == crash_after:
            if strategy == "standalone":  # a client of the next round had saved its adapter
                torn = folder / "clients" / f"client-0000.r{crash_after + 1}.safetensors"
                torn.write_bytes(b"torn")
            raise Crash
        return path

    monkeypatch.setattr(experiment, "save_checkpoint", crashing)
    with pytest.raises(Crash):
        run_experiment(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(experiment, "save_checkpoint", save)
    assert len(rows(tmp_path / "cut")) == crash_after + 1

    resume_experiment(tmp_path / "cut", progress=False)

    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")
    if strategy != "standalone":
        assert_same_adapter(tmp_path / "cut", tmp_path / "whole")


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no checkpoint\.safetensors"):
        run_experiment(tiny(), tmp_path, progress=False, resume=True)
    run_experiment(tiny(rounds=1), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="another configuration"):
        run_experiment(tiny(rounds=1, seed=3), tmp_path / "run", progress=False, resume=True)
    (tmp_path / "run" / FILE).write_bytes(b"\x00" * 20)  # torn or foreign
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(ConfigError, match="cannot resume"):
        resume_experiment(tmp_path / "nothing")


def test_resume_on_the_command_line_takes_the_runs_own_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(tmp_path), "--set", "rounds=3"]) == 2
    assert "drop the config, --set" in capsys.readouterr().err


def test_checkpoints_replace_each_other_whole(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"x": torch.ones(3)}, {"round": 1})
    shared = torch.arange(6.0)
    save_checkpoint(tmp_path, {"x": shared, "view": shared[:2]}, {"round": 2})
    tensors, meta = load_checkpoint(tmp_path)
    assert meta == {"round": 2} and torch.equal(tensors["view"], torch.tensor([0.0, 1.0]))
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary file left

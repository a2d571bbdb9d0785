"""Checkpoints after every round; a run killed at any moment resumes to the same result."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("written", [1, 4])
def test_sigkill_mid_run_then_resume_gives_the_same_run(written: int, tmp_path: Path) -> None:
    # the child is killed as soon as it has written `written` rows (round 0 = the base model):
    # during round `written`, with rounds left to resume, whatever the machine's speed
    run_experiment(tiny(rounds=6), tmp_path / "whole", progress=False)
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "fedlora.cli", "run", str(TINY), "--set", "rounds=6"]
    proc = subprocess.Popen([*argv, "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if (out / FILE).exists() and metrics.read_text().count("\n") >= written:
                break  # whole lines only: the child may be writing the next
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = len(rows(out))
    assert proc.returncode == -signal.SIGKILL and written <= done < 7, done

    resume_experiment(out, progress=False)

    assert rows(out) == rows(tmp_path / "whole")
    assert_same_adapter(out, tmp_path / "whole")


class Crash(Exception):
    pass


PRIVATE = ["privacy.clip_norm=1.0", "privacy.noise_multiplier=0.5", "privacy.noise_seed=7"]


@pytest.mark.parametrize(
    ("strategy", "extra", "crash_after"),
    [
        ("hafl-truncate", [], 1),
        ("hafl-freeze", [], 2),
        ("hetlora", [], 1),
        ("flexlora", [], 1),
        ("ffa", [], 2),
        ("flora", [], 2),
        ("flora-adalora", [], 1),
        ("centralized", [], 1),
        ("standalone", [], 1),
        # each client's own B comes back from its file as of the checkpoint's round
        ("fedsa", ["clients.ranks=[4]"], 1),
        # ε goes on from the checkpoint's rows: the resumed run reports the same ε per round
        ("flora", PRIVATE, 1),
        # bfloat16: the resumed server re-merges FLoRA's float32 updates into float32 terms on
        # its pristine bfloat16 base, and so holds the uninterrupted run's model bitwise
        ("flora", ["model.dtype=bfloat16"], 2),
        ("flexlora", ["model.dtype=bfloat16"], 1),
        # a round's clients trained together: the same groups after resuming, bitwise
        ("flora", ["train.fuse=true"], 1),
        ("flexlora", ["train.fuse=true", "model.dtype=bfloat16"], 2),
    ],
)
def test_a_crash_after_any_round_resumes_to_the_same_run(
    strategy: str,
    extra: list[str],
    crash_after: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = ["rounds=3", "clients.ranks=[8, 4, 2]", "clients.fraction=0.67"]
    cfg = load_config(TINY, [f"strategy={strategy}", *base, *extra])
    run_experiment(cfg, tmp_path / "whole", progress=False)
    save = experiment.save_checkpoint

    def crashing(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> Path:
        path = save(folder, tensors, meta)
        if meta["round"] == crash_after:
            if strategy in ("standalone", "fedsa"):  # a client of the next round saved its own
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
    if extra == PRIVATE:
        assert all("epsilon" in row for row in rows(tmp_path / "cut")[1:])
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
    with pytest.raises(ConfigError, match=r"is not a run folder: .*config\.json cannot be read"):
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

"""Bad input on the command line: exit code 2, one paragraph naming the file, line, column, key
or client, no traceback; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.errors import FedloraError

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
COLUMNS = 'data.columns={prompt="q", response="a"}'
SMALL = ["--set", "data.heldout=1", "--set", "data.source={d}/small.jsonl", "--set", COLUMNS]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "bad.toml").write_text("rounds = 2\nstrategy = \n")
    (tmp_path / "bad.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": "c", "a": \n')
    (tmp_path / "small.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": "c", "a": "d"}\n')
    return tmp_path


CASES = [
    (["run", "{d}/bad.toml"], r"bad\.toml is not valid TOML: Invalid value \(at line 2"),
    (["run", TINY, "--set", "data.source={d}/none.jsonl"], r"none\.jsonl does not exist"),
    (
        ["run", TINY, "--set", "data.source={d}/bad.jsonl", "--set", COLUMNS],
        r"bad\.jsonl line 2: invalid JSON",
    ),
    (
        ["run", TINY, "--set", "data.source={d}/small.jsonl", "--set", COLUMNS.replace("q", "x")],
        r"small\.jsonl: no column 'x' \(mapped to prompt\); available columns: 'q', 'a'",
    ),
    (
        ["run", TINY, *SMALL],
        r"3 clients but only 1 examples",
    ),
    (
        ["run", TINY, "--set", "clients.ranks=[300]"],
        r"client 'client-0000': rank 300 is larger than module '.*q_proj' \(shape \(64, 64\)\)",
    ),
    (["run", TINY, "--set", "faults.timeout=2"], r"faults\.timeout must be a probability"),
]


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_bad_input_is_one_paragraph_with_exit_code_2(
    argv: list[str], message: str, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.replace("{d}", str(files)) for a in argv]
    assert main([*args, "--quiet", "--out", str(files / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_debug_shows_the_traceback(files: Path) -> None:
    with pytest.raises(FedloraError, match="not valid TOML"):
        main(["--debug", "run", str(files / "bad.toml")])

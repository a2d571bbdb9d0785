"""What the ``fedlora`` commands share: argument types, the options several commands take
(declared here once), and the small helpers their handlers call."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

DEVICE_HELP = "auto, cpu or cuda[:N] (default: auto)"


def rank_list(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 64,32,16, got {text!r}"
        ) from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"expected at least one rank, all >= 1, got {text!r}")
    return ranks


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,1,2, got {text!r}"
        )
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def config_argument(parser: argparse.ArgumentParser, default: Path) -> None:
    """An optional positional TOML config with a default file."""
    parser.add_argument(
        "config", nargs="?", type=Path, default=default, help=f"a TOML config (default: {default})"
    )


def set_option(parser: argparse.ArgumentParser, default: list[str] | None, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=default, metavar="KEY=VALUE", help=help
    )


def json_option(parser: argparse.ArgumentParser, what: str = "the figures") -> None:
    """``--json PATH``: also write what the command printed, as JSON."""
    parser.add_argument("--json", type=Path, default=None, help=f"also write {what} to this file")


def quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def workdir_option(parser: argparse.ArgumentParser, name: str, reused: bool = False) -> None:
    """``--workdir DIR``: where the command's runs go (default ``runs/NAME-TIME``)."""
    if reused:
        parser.add_argument(
            "--workdir",
            type=Path,
            default=None,
            help=f"run folders; finished runs there are reused (default: runs/{name})",
        )
    else:
        parser.add_argument(
            "--workdir", type=Path, default=None, help=f"run folders (default: runs/{name}-TIME)"
        )


def adapter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        metavar="DIR",
        help="this PEFT adapter folder instead of RUN_DIR/adapter (e.g. a client's)",
    )
    set_option(parser, [], "override a key of the run's config, e.g. --set eval.rouge_samples=16")


def run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")


def timestamped(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def quiet_libraries(quiet: bool) -> None:
    """Keep the terminal for fedlora's own progress: no library deprecation noise, and no
    per-load progress bars from transformers when ``--quiet``."""
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def progress(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


def report(text: str, figures: dict[str, Any], path: Path | None) -> int:
    """Print a benchmark's table and, with ``--json``, write its figures."""
    print(text)
    if path is not None:
        write_json(path, figures)
        print(f"wrote {path}")
    return 0


def write_json(path: Path, payload: object) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc

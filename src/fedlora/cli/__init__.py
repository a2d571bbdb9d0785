"""The ``fedlora`` command line: ``run``, ``compare``, ``eval``, ``generate``, ``export``,
``doctor``, ``flower`` and ``bench``, one module each (``bench`` one handler per benchmark), every
handler registered on its parser with ``set_defaults(func=...)``; the options several commands
share are declared once (:mod:`fedlora.cli.common`).

Errors fedlora raises on purpose print as one paragraph with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from fedlora import __version__
from fedlora.cli import bench, doctor, flower, run, trained
from fedlora.errors import FedloraError

COMMANDS = (run, trained, doctor, flower, bench)
"""The modules whose ``register(subparsers)`` add the commands, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning with heterogeneous client ranks.",
    )
    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except FedloraError as exc:
        if args.debug:
            raise
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``fedlora`` command: :func:`main`, with SIGTERM turned into an ordinary exit, so the
    processes a run started (a local SuperLink, SuperNodes, their runs) are stopped on the way
    out instead of outliving it."""
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())


def _terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)

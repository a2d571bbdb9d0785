"""``fedlora doctor``: versions, hardware, what ``auto`` picks and why."""

from __future__ import annotations

import argparse
from typing import Any

from fedlora.cli.common import json_option, write_json


def register(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor", help="versions, hardware, what auto picks and why: one screen for a bug report"
    )
    json_option(doctor, "the report")
    doctor.set_defaults(func=doctor_command)


def doctor_command(args: argparse.Namespace) -> int:
    from fedlora.doctor import collect, render

    report = collect()
    print(render(report), end="")
    if args.json is not None:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0

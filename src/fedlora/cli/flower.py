"""``fedlora flower certs``: credentials for a Flower deployment."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    flower = commands.add_parser("flower", help="credentials for a Flower deployment")
    flower_cmds = flower.add_subparsers(dest="flower", required=True, metavar="WHAT")
    certs = flower_cmds.add_parser(
        "certs", help="a CA and a SuperLink certificate for TLS, and SuperNode keys"
    )
    certs.add_argument("folder", type=Path, help="where to write them")
    certs.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="a name or IP the SuperNodes use to reach the SuperLink (repeatable; "
        "localhost and 127.0.0.1 are always included)",
    )
    certs.add_argument(
        "--nodes", type=int, default=0, help="also write this many SuperNode key pairs"
    )
    certs.set_defaults(func=certs_command)


def certs_command(args: argparse.Namespace) -> int:
    from fedlora.flower.certs import make_certificates, make_node_key

    hosts = list(dict.fromkeys([*args.hosts, "localhost", "127.0.0.1"]))
    for path in make_certificates(args.folder, hosts):
        print(f"wrote {path}")
    for k in range(args.nodes):
        for path in make_node_key(args.folder, f"node-{k}"):
            print(f"wrote {path}")
    return 0

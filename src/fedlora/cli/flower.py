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
    node_key = flower_cmds.add_parser(
        "node-key",
        help="on a SuperNode's host: its key pair; only the .pub file goes to the server",
    )
    node_key.add_argument("folder", type=Path, help="where to write it (created mode 700)")
    node_key.add_argument("--name", default="node", help="the key's file name (default: node)")
    node_key.set_defaults(func=node_key_command)


def certs_command(args: argparse.Namespace) -> int:
    from fedlora.flower.certs import make_certificates, make_node_key

    hosts = list(dict.fromkeys([*args.hosts, "localhost", "127.0.0.1"]))
    for path in make_certificates(args.folder, hosts):
        print(f"wrote {path}")
    for k in range(args.nodes):
        for path in make_node_key(args.folder, f"node-{k}"):
            print(f"wrote {path}")
    return 0


def node_key_command(args: argparse.Namespace) -> int:
    from fedlora.flower.certs import make_node_key

    private, public = make_node_key(args.folder, args.name)
    print(f"wrote {private} (private: keep it on this host)")
    print(f"wrote {public}: send it to the server's operator for `flwr supernode register`")
    return 0

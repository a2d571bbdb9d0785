"""``fedlora run`` and ``fedlora compare``: one federated fine-tuning, or several strategies on
identical federations, in-process or on Flower."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedlora.cli.common import positive_int, quiet_libraries, quiet_option, set_option, timestamped
from fedlora.errors import ConfigError


def register(commands: Any) -> None:
    run = commands.add_parser("run", help="run one federated fine-tuning (default: the demo run)")
    _run_arguments(run)
    run.add_argument("--out", type=Path, default=None, help="run folder (default: runs/NAME-TIME)")
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint, with its own config.json (on either "
        "engine: add --engine flower [--superlink ...] to go on on Flower)",
    )
    _engine_arguments(run)
    run.set_defaults(func=run_command)

    compare = commands.add_parser("compare", help="run several strategies on identical federations")
    _run_arguments(compare)
    _engine_arguments(compare)
    compare.add_argument(
        "--strategies",
        required=True,
        help="comma-separated strategies, e.g. flora,flexlora,zeropad,fedit,centralized",
    )
    compare.add_argument(
        "--out", type=Path, default=None, help="folder (default: runs/compare-TIME)"
    )
    compare.set_defaults(func=compare_command)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path, help="a TOML config (default: built-in)")
    set_option(parser, [], "override a config key, e.g. --set rounds=3 --set clients.ranks=[8,4]")
    quiet_option(parser)
    parser.add_argument(
        "--log",
        action="append",
        default=[],
        choices=["tensorboard"],
        help="also log every per-round metric to this logger (RUN_DIR/tensorboard; the config "
        "key log)",
    )


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a run goes: in-process, or Flower (local simulation or a SuperLink)."""
    parser.add_argument(
        "--engine",
        choices=["inprocess", "flower"],
        default="inprocess",
        help="inprocess (default) or flower: Flower's simulation engine, or the SuperLink given "
        "by --superlink",
    )
    parser.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        default=None,
        help="with --engine flower: a running SuperLink to submit to (default: start a local "
        "simulation SuperLink)",
    )
    parser.add_argument(
        "--root-certificates",
        type=Path,
        default=None,
        help="with --superlink: the CA certificate for TLS (a SuperLink on another host needs "
        "it, or --insecure)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="with --superlink on another host: send the run to it without TLS (in the clear)",
    )
    parser.add_argument(
        "--supernodes",
        type=positive_int,
        default=None,
        help="with the local simulation: simulated SuperNodes (default: clients.num_clients)",
    )


def _with_loggers(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--log``'s loggers as the config key ``log``."""
    if not args.log:
        return list(args.overrides)
    return [*args.overrides, "log=" + json.dumps(list(dict.fromkeys(args.log)))]


def run_command(args: argparse.Namespace) -> int:
    from fedlora.config import load_config
    from fedlora.experiment import run_experiment

    if args.resume is not None:
        return _resume(args)
    cfg = load_config(args.config, _with_loggers(args))
    quiet_libraries(args.quiet)
    out = args.out or timestamped(cfg.label)
    if args.engine == "flower":
        summary = _run_flower(args, cfg, out, resume=False)
    else:
        _inprocess_only(args)
        summary = run_experiment(cfg, out, progress=not args.quiet)
    print((out / "summary.md").read_text())
    print(f"run folder: {out}  ({summary['seconds']:.0f} s)")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from fedlora.experiment import resume_experiment, run_config_of

    if args.config or args.overrides or args.out:
        raise ConfigError(
            "--resume RUN_DIR takes the run's own config and folder; drop the config, --set "
            "and --out"
        )
    quiet_libraries(args.quiet)
    if args.engine == "flower":
        summary = _run_flower(args, run_config_of(args.resume), args.resume, resume=True)
    else:
        _inprocess_only(args)
        summary = resume_experiment(args.resume, progress=not args.quiet)
    print((args.resume / "summary.md").read_text())
    print(f"run folder: {args.resume}  ({summary['seconds']:.0f} s after resuming)")
    return 0


def _inprocess_only(args: argparse.Namespace) -> None:
    if args.superlink or args.root_certificates or args.supernodes or args.insecure:
        raise ConfigError(
            "--superlink, --root-certificates, --insecure and --supernodes need --engine flower"
        )


def _run_flower(args: argparse.Namespace, cfg: Any, out: Path, resume: bool) -> dict[str, Any]:
    from fedlora.flower.launch import run_simulation, submit

    echo = not args.quiet
    if args.superlink:
        if args.supernodes:
            raise ConfigError("--supernodes is for the local simulation, not with --superlink")
        _check_transport(args.superlink, args.root_certificates, args.insecure)
        return submit(cfg, out, args.superlink, args.root_certificates, echo=echo, resume=resume)
    if args.root_certificates:
        raise ConfigError("--root-certificates needs --superlink")
    if args.insecure:
        raise ConfigError("--insecure needs --superlink")
    return run_simulation(cfg, out, args.supernodes, echo=echo, resume=resume)


def compare_command(args: argparse.Namespace) -> int:
    from fedlora.config import check, load_config
    from fedlora.experiment import compare_strategies

    cfg = load_config(args.config, _with_loggers(args))
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for name in names:  # validate every name before any run starts
        check(cfg.running(name))
        if args.engine == "flower":
            from fedlora.flower.strategy import check_flower

            check_flower(cfg.running(name))
    quiet_libraries(args.quiet)
    out = args.out or timestamped("compare")
    if args.engine == "flower":

        def on_flower(run_cfg: Any, folder: Path) -> dict[str, Any]:
            return _run_flower(args, run_cfg, folder, resume=False)

        _, table = compare_strategies(cfg, names, out, run=on_flower)
    else:
        _inprocess_only(args)
        _, table = compare_strategies(cfg, names, out, progress=not args.quiet)
    print(table)
    print(f"comparison folder: {out}")
    return 0


LOOPBACK = ("127.", "localhost:", "[::1]:")


def _check_transport(superlink: str, certificates: Path | None, insecure: bool) -> None:
    """A SuperLink on another host is reached over TLS (``--root-certificates``) unless the user
    says ``--insecure``: the run's config, and with it the nodes' training plans, would otherwise
    travel in the clear. One on this host (loopback) needs neither."""
    if certificates is not None and insecure:
        raise ConfigError("--root-certificates and --insecure exclude each other")
    if certificates is None and not insecure and not superlink.startswith(LOOPBACK):
        raise ConfigError(
            f"--superlink {superlink} is another host and no --root-certificates were given: "
            "give the SuperLink's CA certificate for TLS, or --insecure to send the run in the "
            "clear"
        )

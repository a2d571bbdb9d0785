"""The ``fedlora`` command line: ``run``, ``compare``, ``flower`` and ``bench``.

Errors fedlora raises on purpose print as one paragraph with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from fedlora import __version__
from fedlora.errors import ConfigError, FedloraError


def _rank_list(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 64,32,16, got {text!r}"
        ) from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"expected at least one rank, all >= 1, got {text!r}")
    return ranks


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,1,2, got {text!r}"
        )
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning with heterogeneous client ranks.",
    )
    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    ev = commands.add_parser(
        "eval", help="score a finished run's result (base model and with its adapter) on any data"
    )
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")
    ev.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="score every example of this source (a builtin name or a .jsonl/.csv/.parquet file; "
        "data.limit, data.kind and data.columns apply) instead of the run's held-out split",
    )
    _adapter_options(ev)
    ev.add_argument(
        "--harness",
        type=Path,
        default=None,
        metavar="DIR",
        help="instead: score the choice examples (the run's benchmark, its held-out choices, or "
        "--data) with fedlora and with lm-evaluation-harness, same adapter; task files in DIR",
    )
    ev.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    gen = commands.add_parser(
        "generate", help="answers of a finished run's model beside the base model's"
    )
    gen.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more user turns")
    _adapter_options(gen)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampled"
    )
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's p")
    gen.add_argument("--seed", type=int, default=0, help="the sampling seed")

    export = commands.add_parser(
        "export", help="write a finished run's full model: its base with the global adapter merged"
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")
    export.add_argument(
        "--merged",
        type=Path,
        required=True,
        metavar="DIR",
        help="where to write the merged model (float32 safetensors and the tokenizer)",
    )

    doctor = commands.add_parser(
        "doctor", help="versions, hardware, what auto picks and why: one screen for a bug report"
    )
    doctor.add_argument("--json", type=Path, default=None, help="also write the report here")

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

    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    agg = benches.add_parser(
        "aggregation",
        help="time every strategy; FlexLoRA's factored SVD against the dense reference",
    )
    agg.add_argument("--d-in", type=_positive_int, default=4096, help="module input size")
    agg.add_argument("--d-out", type=_positive_int, default=4096, help="module output size")
    agg.add_argument(
        "--ranks",
        type=_rank_list,
        default=[64, 32, 16, 16, 8, 8, 4, 4, 4, 4],
        help="client ranks, comma-separated (default: FLoRA's 64,32,16,16,8,8,4,4,4,4)",
    )
    agg.add_argument("--repeat", type=_positive_int, default=3, help="timed runs per strategy")
    agg.add_argument("--seed", type=int, default=0, help="seed of the synthetic client factors")
    agg.add_argument("--json", type=Path, default=None, help="also write the figures to this file")

    flower_bench = benches.add_parser(
        "flower",
        help="seconds per round in-process, on Flower's simulation engine and on a local "
        "deployment, same config; a ClientApp process's start",
    )
    _config_argument(flower_bench, Path("configs/tiny.toml"))
    _set_option(flower_bench, ["rounds=4"], "override a config key (default: rounds=4)")
    flower_bench.add_argument(
        "--workdir", type=Path, default=None, help="run folders (default: runs/bench-flower-TIME)"
    )
    flower_bench.add_argument(
        "--json", type=Path, default=None, help="also write the figures to this file"
    )

    study = benches.add_parser(
        "study",
        help="a grid of runs from a study file (variants × strategies × seeds): tables, plot, JSON",
    )
    study.add_argument("file", type=Path, help="a study file, e.g. benchmarks/weighting.toml")
    _set_option(study, [], "override a config key in every run, after the study's own settings")
    study.add_argument(
        "--seeds", type=_int_list, default=None, help="seeds, comma-separated (default: the file's)"
    )
    study.add_argument(
        "--out", type=Path, default=None, help="results folder (default: benchmarks/results/NAME)"
    )
    study.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="run folders; finished runs there are reused (default: runs/study-NAME)",
    )

    comm = benches.add_parser(
        "comm",
        help="parameters sent per round per strategy vs full fine-tuning (Llama-7B and a model)",
    )
    comm.add_argument("--model", default="smollm2-135m", help="the second model's shapes")
    comm.add_argument("--rounds", type=_positive_int, default=3, help="rounds (default: 3)")
    comm.add_argument(
        "--check",
        type=Path,
        action="append",
        default=None,
        help="a study's JSON whose runs' recorded traffic is checked against the computation "
        "(default: every study under benchmarks/results)",
    )
    comm.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/comm"), help="results folder"
    )

    scale = benches.add_parser(
        "scale", help="peak memory and seconds per round with 10 vs 1,000 registered clients"
    )
    _config_argument(scale, Path("configs/default.toml"))
    _set_option(
        scale,
        None,
        "override a config key, after the defaults rounds=3, train.steps=2, "
        "data.source=mmlu, data.heldout=32, model.max_length=64",
    )
    scale.add_argument("--json", type=Path, default=None, help="also write the figures here")
    scale.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/scale"), help="results folder"
    )
    scale.add_argument(
        "--workdir", type=Path, default=None, help="run folders (default: runs/bench-scale-TIME)"
    )

    over = benches.add_parser(
        "overhead", help="seconds per local step: fedlora's client code vs a bare torch+peft loop"
    )
    over.add_argument("--model", default="smollm2-135m", help="model (default: the embedded one)")
    over.add_argument("--steps", type=_positive_int, default=5, help="steps per timed run")
    over.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per side")
    over.add_argument("--batch-size", type=_positive_int, default=4)
    over.add_argument("--seq-len", type=_positive_int, default=64)
    over.add_argument("--rank", type=_positive_int, default=8)
    over.add_argument(
        "--dtype", default="auto", help="compute dtype of both sides (default: auto, as runs)"
    )
    over.add_argument("--json", type=Path, default=None, help="also write the figures to this file")

    prec = benches.add_parser(
        "precision",
        help="seconds per step in float32 vs the default dtype, GFLOP/s against the matmul peak, "
        "held-out loss of the default run in both, FLoRA's merge error",
    )
    _set_option(prec, [], "override a key of the default config (e.g. model.name) in every part")
    prec.add_argument("--steps", type=_positive_int, default=5, help="steps per timed run")
    prec.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per side")
    prec.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="run folders (default: runs/bench-precision-TIME)",
    )
    prec.add_argument("--json", type=Path, default=None, help="also write the figures to this file")

    quant = benches.add_parser(
        "quantization",
        help="one client's peak memory and s/step per quantization × rank, and the default run's "
        "held-out loss with every client quantized",
    )
    _set_option(quant, [], "override a key of the default run's config")
    quant.add_argument("--model", default="smollm2-135m", help="the base model")
    quant.add_argument("--ranks", type=_rank_list, default=[4, 16, 64], help="e.g. 4,16,64")
    quant.add_argument("--steps", type=_positive_int, default=5, help="timed steps per client")
    quant.add_argument("--no-runs", action="store_true", help="skip the default runs")
    quant.add_argument(
        "--workdir", type=Path, default=None, help="run folders (default: runs/bench-quant-TIME)"
    )
    quant.add_argument("--json", type=Path, default=None, help="also write the figures here")
    quant.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    over.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")

    gpu = benches.add_parser(
        "gpu",
        help="the GPU validation: placement, every strategy in float32 and bfloat16, DP, "
        "quantized clients, CPU parity, deterministic resume, an 8B-shaped Llama, Flower, the "
        "default run (about 8 min on one GPU; --device cpu --quick on a CPU)",
    )
    gpu.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    gpu.add_argument("--quick", action="store_true", help="leave out the Flower and default runs")
    gpu.add_argument(
        "--only", default="", help="comma-separated checks (default: all), e.g. large,parity"
    )
    gpu.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folders and gpu.json (default: runs/bench-gpu-TIME)",
    )
    gpu.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    return parser


def _config_argument(parser: argparse.ArgumentParser, default: Path) -> None:
    """An optional positional TOML config with a default file."""
    parser.add_argument(
        "config", nargs="?", type=Path, default=default, help=f"a TOML config (default: {default})"
    )


def _set_option(parser: argparse.ArgumentParser, default: list[str] | None, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=default, metavar="KEY=VALUE", help=help
    )


def _adapter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        metavar="DIR",
        help="this PEFT adapter folder instead of RUN_DIR/adapter (e.g. a client's)",
    )
    _set_option(parser, [], "override a key of the run's config, e.g. --set eval.rouge_samples=16")


def _with_loggers(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--log``'s loggers as the config key ``log``."""
    if not args.log:
        return list(args.overrides)
    return [*args.overrides, "log=" + json.dumps(list(dict.fromkeys(args.log)))]


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path, help="a TOML config (default: built-in)")
    _set_option(parser, [], "override a config key, e.g. --set rounds=3 --set clients.ranks=[8,4]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
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
        help="with --superlink: the CA certificate for TLS (default: insecure)",
    )
    parser.add_argument(
        "--supernodes",
        type=_positive_int,
        default=None,
        help="with the local simulation: simulated SuperNodes (default: clients.num_clients)",
    )


def _timestamped(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _quiet_libraries(quiet: bool) -> None:
    """Keep the terminal for fedlora's own progress: no library deprecation noise, and no
    per-load progress bars from transformers when ``--quiet``."""
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _run(args: argparse.Namespace) -> int:
    from fedlora.config import load_config
    from fedlora.experiment import run_experiment

    if args.resume is not None:
        return _resume(args)
    cfg = load_config(args.config, _with_loggers(args))
    _quiet_libraries(args.quiet)
    out = args.out or _timestamped(cfg.strategy)
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
    _quiet_libraries(args.quiet)
    if args.engine == "flower":
        summary = _run_flower(args, run_config_of(args.resume), args.resume, resume=True)
    else:
        _inprocess_only(args)
        summary = resume_experiment(args.resume, progress=not args.quiet)
    print((args.resume / "summary.md").read_text())
    print(f"run folder: {args.resume}  ({summary['seconds']:.0f} s after resuming)")
    return 0


def _inprocess_only(args: argparse.Namespace) -> None:
    if args.superlink or args.root_certificates or args.supernodes:
        raise ConfigError("--superlink, --root-certificates and --supernodes need --engine flower")


def _run_flower(args: argparse.Namespace, cfg: Any, out: Path, resume: bool) -> dict[str, Any]:
    from fedlora.flower.launch import run_simulation, submit

    echo = not args.quiet
    if args.superlink:
        if args.supernodes:
            raise ConfigError("--supernodes is for the local simulation, not with --superlink")
        return submit(cfg, out, args.superlink, args.root_certificates, echo=echo, resume=resume)
    if args.root_certificates:
        raise ConfigError("--root-certificates needs --superlink")
    return run_simulation(cfg, out, args.supernodes, echo=echo, resume=resume)


def _flower_certs(args: argparse.Namespace) -> int:
    from fedlora.flower.certs import make_certificates, make_node_key

    hosts = list(dict.fromkeys([*args.hosts, "localhost", "127.0.0.1"]))
    for path in make_certificates(args.folder, hosts):
        print(f"wrote {path}")
    for k in range(args.nodes):
        for path in make_node_key(args.folder, f"node-{k}"):
            print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedlora.config import check, load_config
    from fedlora.experiment import compare_strategies

    cfg = load_config(args.config, _with_loggers(args))
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for name in names:  # validate every name before any run starts
        check(dataclasses.replace(cfg, strategy=name))
        if args.engine == "flower":
            from fedlora.flower.apps import check_flower

            check_flower(dataclasses.replace(cfg, strategy=name))
    _quiet_libraries(args.quiet)
    out = args.out or _timestamped("compare")
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


def _bench_aggregation(args: argparse.Namespace) -> int:
    from fedlora.bench.aggregation import format_table, run_aggregation_bench

    result = run_aggregation_bench(
        d_in=args.d_in,
        d_out=args.d_out,
        ranks=args.ranks,
        repeat=args.repeat,
        seed=args.seed,
        progress=_progress,
    )
    return _report(format_table(result), result.to_json(), args.json)


def _bench_overhead(args: argparse.Namespace) -> int:
    from fedlora.bench.overhead import format_overhead, run_overhead_bench

    result = run_overhead_bench(
        model_name=args.model,
        steps=args.steps,
        repeats=args.repeats,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        dtype=args.dtype,
        progress=_progress,
        device=args.device,
    )
    return _report(format_overhead(result), result.to_json(), args.json)


def _bench_precision(args: argparse.Namespace) -> int:
    from fedlora.bench.precision import format_precision, run_precision_bench

    _quiet_libraries(True)
    workdir = args.workdir or _timestamped("bench-precision")
    result = run_precision_bench(
        workdir,
        steps=args.steps,
        repeats=args.repeats,
        overrides=args.overrides,
        progress=_progress,
    )
    return _report(format_precision(result), result.to_json(), args.json)


def _bench_quantization(args: argparse.Namespace) -> int:
    from fedlora.bench.quantization import format_quantization, run_quantization_bench

    _quiet_libraries(True)
    workdir = args.workdir or _timestamped("bench-quant")
    result = run_quantization_bench(
        workdir,
        model=args.model,
        ranks=args.ranks,
        steps=args.steps,
        runs=not args.no_runs,
        overrides=args.overrides,
        progress=_progress,
        device=args.device,
    )
    return _report(format_quantization(result), result.to_json(), args.json)


def _bench_flower(args: argparse.Namespace) -> int:
    from fedlora.bench.flower import format_flower, run_flower_bench
    from fedlora.config import load_config

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries(True)
    workdir = args.workdir or _timestamped("bench-flower")
    _progress(
        f"{cfg.strategy}, {cfg.rounds} rounds: in-process, then Flower's simulation engine, "
        "then a local Flower deployment"
    )
    result = run_flower_bench(cfg, workdir)
    return _report(format_flower(result), result.to_json(), args.json)


def _progress(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


def _bench_study(args: argparse.Namespace) -> int:
    from fedlora.bench.study import load_study, run_study, with_seeds, write_study

    study = with_seeds(load_study(args.file), args.seeds)
    _quiet_libraries(True)
    workdir = args.workdir or Path("runs") / f"study-{study.name}"
    out = args.out or Path("benchmarks") / "results" / study.name
    result = run_study(study, workdir, args.overrides, progress=_progress)
    paths = write_study(result, out)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({result.seconds:.0f} s)")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from fedlora.bench.scale import DEFAULT_SET, format_scale, run_scale_bench, write_scale
    from fedlora.config import load_config

    cfg = load_config(args.config, [*DEFAULT_SET, *(args.overrides or [])])
    result = run_scale_bench(cfg, args.workdir or _timestamped("bench-scale"))
    paths = write_scale(result, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return _report(format_scale(result), result, args.json)


def _bench_comm(args: argparse.Namespace) -> int:
    from fedlora.bench.comm import run_comm_study, study_results

    _quiet_libraries(True)
    checks = args.check if args.check else study_results(Path("benchmarks") / "results")
    result = run_comm_study(args.out, args.model, args.rounds, checks)
    print((args.out / "comm.md").read_text())
    bad = [c["run"] for c in result.get("checked_runs", []) if not c["match"]]
    if bad:
        raise FedloraError(f"recorded traffic differs from the computation in runs {bad}")
    print(f"wrote {args.out}/comm.json, comm.md, comm.png")
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from fedlora.bench.gpu import CHECKS, format_gpu, run_gpu_validation

    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: the checks are {', '.join(CHECKS)}")
    _quiet_libraries(True)
    out = args.out or _timestamped("bench-gpu")
    report = run_gpu_validation(out, args.device, args.quick, only, progress=print)
    _report(format_gpu(report), report, args.json)
    print(f"wrote {out / 'gpu.json'}")
    return 0 if report["ok"] else 1


def _report(text: str, figures: dict[str, Any], path: Path | None) -> int:
    """Print a benchmark's table and, with ``--json``, write its figures."""
    print(text)
    if path is not None:
        _write_json(path, figures)
        print(f"wrote {path}")
    return 0


def _write_json(path: Path, payload: object) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


def entry() -> None:
    """The ``fedlora`` command: :func:`main`, with SIGTERM turned into an ordinary exit, so the
    processes a run started (a local SuperLink, SuperNodes, their runs) are stopped on the way
    out instead of outliving it."""
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())


def _eval(args: argparse.Namespace) -> int:
    from fedlora.trained import comparison_markdown, evaluate_trained, load_trained

    _quiet_libraries(args.quiet)
    trained = load_trained(args.run_dir, args.overrides, args.adapter)
    if args.harness is not None:
        from fedlora.trained import harness_check, harness_markdown

        result = harness_check(trained, args.data, args.harness, progress=not args.quiet)
        print(harness_markdown(result))
    else:
        result = evaluate_trained(trained, args.data, progress=not args.quiet)
        print(comparison_markdown(result))
    if args.json is not None:
        from fedlora.bench.provenance import provenance

        _write_json(args.json, {**result, "overrides": args.overrides, "provenance": provenance()})
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedlora.trained import generate_answers, load_trained

    _quiet_libraries(True)
    trained = load_trained(args.run_dir, args.overrides, args.adapter)
    answers = generate_answers(
        trained, args.prompts, args.max_new_tokens, args.temperature, args.top_p, args.seed
    )
    for i, prompt in enumerate(args.prompts):
        print(f"prompt:  {prompt}")
        print(f"base:    {answers['base'][i]}")
        print(f"trained: {answers['trained'][i]}")
        print()
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedlora.experiment import export_merged

    folder = export_merged(args.run_dir, args.merged)
    print(f"fedlora: the merged model of {args.run_dir} is in {folder}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from fedlora.doctor import collect, render

    report = collect()
    print(render(report), end="")
    if args.json is not None:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "export":
            return _export(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "flower" and args.flower == "certs":
            return _flower_certs(args)
        if args.command == "bench" and args.bench == "aggregation":
            return _bench_aggregation(args)
        if args.command == "bench" and args.bench == "flower":
            return _bench_flower(args)
        if args.command == "bench" and args.bench == "overhead":
            return _bench_overhead(args)
        if args.command == "bench" and args.bench == "precision":
            return _bench_precision(args)
        if args.command == "bench" and args.bench == "quantization":
            return _bench_quantization(args)
        if args.command == "bench" and args.bench == "study":
            return _bench_study(args)
        if args.command == "bench" and args.bench == "comm":
            return _bench_comm(args)
        if args.command == "bench" and args.bench == "gpu":
            return _bench_gpu(args)
        if args.command == "bench" and args.bench == "scale":
            return _bench_scale(args)
        raise ConfigError(f"unknown command {args.command!r}")
    except FedloraError as exc:
        if args.debug:
            raise
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    entry()

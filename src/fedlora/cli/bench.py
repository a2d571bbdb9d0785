"""``fedlora bench NAME``: each benchmark prints its figures (``--json`` also writes them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedlora.cli.common import (
    config_argument,
    device_option,
    int_list,
    json_option,
    positive_int,
    progress,
    quiet_libraries,
    rank_list,
    report,
    set_option,
    timestamped,
    workdir_option,
)
from fedlora.errors import ConfigError, FedloraError


def register(commands: Any) -> None:
    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for add in (
        _aggregation,
        _flower,
        _study,
        _comm,
        _scale,
        _overhead,
        _fused,
        _precision,
        _quant,
        _gpu,
    ):
        add(benches)


def _aggregation(benches: Any) -> None:
    agg = benches.add_parser(
        "aggregation",
        help="time every strategy; FlexLoRA's factored SVD against the dense reference",
    )
    agg.add_argument("--d-in", type=positive_int, default=4096, help="module input size")
    agg.add_argument("--d-out", type=positive_int, default=4096, help="module output size")
    agg.add_argument(
        "--ranks",
        type=rank_list,
        default=[64, 32, 16, 16, 8, 8, 4, 4, 4, 4],
        help="client ranks, comma-separated (default: FLoRA's 64,32,16,16,8,8,4,4,4,4)",
    )
    agg.add_argument("--repeat", type=positive_int, default=3, help="timed runs per strategy")
    agg.add_argument("--seed", type=int, default=0, help="seed of the synthetic client factors")
    json_option(agg)
    agg.set_defaults(func=aggregation_command)


def aggregation_command(args: argparse.Namespace) -> int:
    from fedlora.bench.aggregation import format_table, run_aggregation_bench

    result = run_aggregation_bench(
        d_in=args.d_in,
        d_out=args.d_out,
        ranks=args.ranks,
        repeat=args.repeat,
        seed=args.seed,
        progress=progress,
    )
    return report(format_table(result), result.to_json(), args.json)


def _flower(benches: Any) -> None:
    flower_bench = benches.add_parser(
        "flower",
        help="seconds per round in-process, on Flower's simulation engine and on a local "
        "deployment, same config; a ClientApp process's start",
    )
    config_argument(flower_bench, Path("configs/tiny.toml"))
    set_option(flower_bench, ["rounds=4"], "override a config key (default: rounds=4)")
    workdir_option(flower_bench, "bench-flower")
    flower_bench.add_argument(
        "--node-threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads of each deployment node (default: this machine's cores shared out)",
    )
    json_option(flower_bench)
    flower_bench.set_defaults(func=flower_command)


def flower_command(args: argparse.Namespace) -> int:
    from fedlora.bench.flower import format_flower, run_flower_bench
    from fedlora.config import load_config

    cfg = load_config(args.config, args.overrides)
    quiet_libraries(True)
    workdir = args.workdir or timestamped("bench-flower")
    progress(
        f"{cfg.label}, {cfg.rounds} rounds: in-process, then Flower's simulation engine, "
        "then a local Flower deployment"
    )
    if args.node_threads is not None and args.node_threads < 1:
        raise ConfigError(f"--node-threads must be >= 1, got {args.node_threads}")
    result = run_flower_bench(cfg, workdir, args.node_threads)
    return report(format_flower(result), result.to_json(), args.json)


def _study(benches: Any) -> None:
    study = benches.add_parser(
        "study",
        help="a grid of runs from a study file (variants × strategies × seeds): tables, plot, JSON",
    )
    study.add_argument("file", type=Path, help="a study file, e.g. benchmarks/weighting.toml")
    set_option(study, [], "override a config key in every run, after the study's own settings")
    study.add_argument(
        "--seeds", type=int_list, default=None, help="seeds, comma-separated (default: the file's)"
    )
    study.add_argument(
        "--out", type=Path, default=None, help="results folder (default: benchmarks/results/NAME)"
    )
    workdir_option(study, "study-NAME", reused=True)
    study.set_defaults(func=study_command)


def study_command(args: argparse.Namespace) -> int:
    from fedlora.bench.study import load_study, run_study, with_seeds, write_study

    study = with_seeds(load_study(args.file), args.seeds)
    quiet_libraries(True)
    workdir = args.workdir or Path("runs") / f"study-{study.name}"
    out = args.out or Path("benchmarks") / "results" / study.name
    result = run_study(study, workdir, args.overrides, progress=progress)
    paths = write_study(result, out)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({result.seconds:.0f} s)")
    return 0


def _comm(benches: Any) -> None:
    comm = benches.add_parser(
        "comm",
        help="parameters sent per round per strategy vs full fine-tuning (Llama-7B and a model)",
    )
    comm.add_argument("--model", default="smollm2-135m", help="the second model's shapes")
    comm.add_argument("--rounds", type=positive_int, default=3, help="rounds (default: 3)")
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
    comm.set_defaults(func=comm_command)


def comm_command(args: argparse.Namespace) -> int:
    from fedlora.bench.comm import run_comm_study, study_results

    quiet_libraries(True)
    checks = args.check if args.check else study_results(Path("benchmarks") / "results")
    result = run_comm_study(args.out, args.model, args.rounds, checks)
    print((args.out / "comm.md").read_text())
    bad = [c["run"] for c in result.get("checked_runs", []) if not c["match"]]
    if bad:
        raise FedloraError(f"recorded traffic differs from the computation in runs {bad}")
    print(f"wrote {args.out}/comm.json, comm.md, comm.png")
    return 0


def _scale(benches: Any) -> None:
    scale = benches.add_parser(
        "scale", help="peak memory and seconds per round with 10 vs 1,000 registered clients"
    )
    config_argument(scale, Path("configs/default.toml"))
    set_option(
        scale,
        None,
        "override a config key, after the defaults rounds=3, train.steps=2, "
        "data.source=mmlu, data.heldout=32, model.max_length=64",
    )
    json_option(scale)
    scale.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/scale"), help="results folder"
    )
    scale.add_argument(
        "--engine",
        choices=["inprocess", "flower"],
        default="inprocess",
        help="in-process, or Flower's simulation engine (a SuperNode per registered client)",
    )
    scale.add_argument(
        "--sampled",
        type=int,
        default=10,
        help="clients sampled per round (at most all 10 on the 10-client side); default 10",
    )
    workdir_option(scale, "bench-scale")
    scale.set_defaults(func=scale_command)


def scale_command(args: argparse.Namespace) -> int:
    from fedlora.bench.scale import DEFAULT_SET, format_scale, run_scale_bench, write_scale
    from fedlora.config import load_config

    cfg = load_config(args.config, [*DEFAULT_SET, *(args.overrides or [])])
    workdir = args.workdir or timestamped("bench-scale")
    result = run_scale_bench(cfg, workdir, args.engine, args.sampled)
    paths = write_scale(result, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return report(format_scale(result), result, args.json)


def _overhead(benches: Any) -> None:
    over = benches.add_parser(
        "overhead", help="seconds per local step: fedlora's client code vs a bare torch+peft loop"
    )
    over.add_argument("--model", default="smollm2-135m", help="model (default: the embedded one)")
    over.add_argument("--steps", type=positive_int, default=5, help="steps per timed run")
    over.add_argument("--repeats", type=positive_int, default=5, help="timed runs per side")
    over.add_argument("--batch-size", type=positive_int, default=4)
    over.add_argument("--seq-len", type=positive_int, default=64)
    over.add_argument("--rank", type=positive_int, default=8)
    over.add_argument(
        "--dtype", default="auto", help="compute dtype of both sides (default: auto, as runs)"
    )
    json_option(over)
    device_option(over)
    over.set_defaults(func=overhead_command)


def overhead_command(args: argparse.Namespace) -> int:
    from fedlora.bench.overhead import format_overhead, run_overhead_bench

    result = run_overhead_bench(
        model_name=args.model,
        steps=args.steps,
        repeats=args.repeats,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        dtype=args.dtype,
        progress=progress,
        device=args.device,
    )
    return report(format_overhead(result), result.to_json(), args.json)


def _fused(benches: Any) -> None:
    fuse = benches.add_parser(
        "fused",
        help="a round's clients trained one at a time vs together (train.fuse): speed, the bound "
        "batching allows, GFLOP/s against the matmul peak, peak memory",
    )
    fuse.add_argument("--model", default="smollm2-135m", help="model (default: the embedded one)")
    fuse.add_argument("--steps", type=positive_int, default=4, help="steps per client per run")
    fuse.add_argument("--repeats", type=positive_int, default=3, help="timed runs per side")
    fuse.add_argument("--batch-size", type=positive_int, default=4)
    fuse.add_argument("--seq-len", type=positive_int, default=64)
    fuse.add_argument(
        "--clients", default="3,10", help="group sizes, comma-separated (default: 3,10)"
    )
    fuse.add_argument("--dtype", default="auto", help="compute dtype (default: auto, as runs)")
    json_option(fuse)
    device_option(fuse)
    fuse.set_defaults(func=fused_command)


def fused_command(args: argparse.Namespace) -> int:
    from fedlora.bench.fused import format_fused, run_fused_bench

    sizes = [int(x) for x in str(args.clients).split(",") if x.strip()]
    if not sizes or min(sizes) < 2:
        raise ConfigError(f"--clients: group sizes of at least 2, got {args.clients!r}")
    result = run_fused_bench(
        model_name=args.model,
        steps=args.steps,
        repeats=args.repeats,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        sizes=sizes,
        dtype=args.dtype,
        progress=progress,
        device=args.device,
    )
    return report(format_fused(result), result.to_json(), args.json)


def _precision(benches: Any) -> None:
    prec = benches.add_parser(
        "precision",
        help="seconds per step in float32 vs the default dtype, GFLOP/s against the matmul peak, "
        "held-out loss of the default run in both, FLoRA's merge error",
    )
    set_option(prec, [], "override a key of the default config (e.g. model.name) in every part")
    prec.add_argument("--steps", type=positive_int, default=5, help="steps per timed run")
    prec.add_argument("--repeats", type=positive_int, default=3, help="timed runs per side")
    workdir_option(prec, "bench-precision")
    json_option(prec)
    prec.set_defaults(func=precision_command)


def precision_command(args: argparse.Namespace) -> int:
    from fedlora.bench.precision import format_precision, run_precision_bench

    quiet_libraries(True)
    workdir = args.workdir or timestamped("bench-precision")
    result = run_precision_bench(
        workdir,
        steps=args.steps,
        repeats=args.repeats,
        overrides=args.overrides,
        progress=progress,
    )
    return report(format_precision(result), result.to_json(), args.json)


def _quant(benches: Any) -> None:
    quant = benches.add_parser(
        "quantization",
        help="one client's peak memory and s/step per quantization × rank, and the default run's "
        "held-out loss with every client quantized",
    )
    set_option(quant, [], "override a key of the default run's config")
    quant.add_argument("--model", default="smollm2-135m", help="the base model")
    quant.add_argument("--ranks", type=rank_list, default=[4, 16, 64], help="e.g. 4,16,64")
    quant.add_argument("--steps", type=positive_int, default=5, help="timed steps per client")
    quant.add_argument("--no-runs", action="store_true", help="skip the default runs")
    workdir_option(quant, "bench-quant")
    json_option(quant)
    device_option(quant)
    quant.set_defaults(func=quantization_command)


def quantization_command(args: argparse.Namespace) -> int:
    from fedlora.bench.quantization import format_quantization, run_quantization_bench

    quiet_libraries(True)
    workdir = args.workdir or timestamped("bench-quant")
    result = run_quantization_bench(
        workdir,
        model=args.model,
        ranks=args.ranks,
        steps=args.steps,
        runs=not args.no_runs,
        overrides=args.overrides,
        progress=progress,
        device=args.device,
    )
    return report(format_quantization(result), result.to_json(), args.json)


def _gpu(benches: Any) -> None:
    gpu = benches.add_parser(
        "gpu",
        help="the GPU validation: placement, every strategy in float32 and bfloat16, DP, "
        "quantized clients, CPU parity, deterministic resume, an 8B-shaped Llama, Flower, the "
        "default run (about 8 min on one GPU; --device cpu --quick on a CPU)",
    )
    device_option(gpu)
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
    json_option(gpu, "the report")
    gpu.set_defaults(func=gpu_command)


def gpu_command(args: argparse.Namespace) -> int:
    from fedlora.bench.gpu import CHECKS, format_gpu, run_gpu_validation

    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: the checks are {', '.join(CHECKS)}")
    quiet_libraries(True)
    out = args.out or timestamped("bench-gpu")
    result = run_gpu_validation(out, args.device, args.quick, only, progress=print)
    report(format_gpu(result), result, args.json)
    print(f"wrote {out / 'gpu.json'}")
    return 0 if result["ok"] else 1

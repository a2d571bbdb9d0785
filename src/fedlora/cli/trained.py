"""``fedlora eval``, ``generate`` and ``export``: what a finished run's model does."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedlora.cli.common import (
    adapter_options,
    json_option,
    positive_int,
    quiet_libraries,
    quiet_option,
    run_dir_argument,
    write_json,
)


def register(commands: Any) -> None:
    ev = commands.add_parser(
        "eval", help="score a finished run's result (base model and with its adapter) on any data"
    )
    run_dir_argument(ev)
    ev.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="score every example of this source (a builtin name or a .jsonl/.csv/.parquet file; "
        "data.limit, data.kind and data.columns apply) instead of the run's held-out split",
    )
    adapter_options(ev)
    ev.add_argument(
        "--harness",
        type=Path,
        default=None,
        metavar="DIR",
        help="instead: score the choice examples (the run's benchmark, its held-out choices, or "
        "--data) with fedlora and with lm-evaluation-harness, same adapter; task files in DIR",
    )
    json_option(ev)
    quiet_option(ev)
    ev.set_defaults(func=eval_command)

    gen = commands.add_parser(
        "generate", help="answers of a finished run's model beside the base model's"
    )
    run_dir_argument(gen)
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more user turns")
    adapter_options(gen)
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampled"
    )
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's p")
    gen.add_argument("--seed", type=int, default=0, help="the sampling seed")
    gen.set_defaults(func=generate_command)

    export = commands.add_parser(
        "export", help="write a finished run's full model: its base with the global adapter merged"
    )
    run_dir_argument(export)
    export.add_argument(
        "--merged",
        type=Path,
        required=True,
        metavar="DIR",
        help="where to write the merged model (float32 safetensors and the tokenizer)",
    )
    export.set_defaults(func=export_command)


def eval_command(args: argparse.Namespace) -> int:
    from fedlora.trained import comparison_markdown, evaluate_trained, load_trained

    quiet_libraries(args.quiet)
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

        write_json(args.json, {**result, "overrides": args.overrides, "provenance": provenance()})
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from fedlora.trained import generate_answers, load_trained

    quiet_libraries(True)
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


def export_command(args: argparse.Namespace) -> int:
    from fedlora.experiment import export_merged

    folder = export_merged(args.run_dir, args.merged)
    print(f"fedlora: the merged model of {args.run_dir} is in {folder}")
    return 0

"""A run from config to run folder, and a comparison of strategies on identical federations.

``run_experiment`` reads top to bottom: set up → rounds → export → report.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from fedlora import adapters
from fedlora.config import RunConfig, to_dict
from fedlora.report import RunWriter, comparison, headline_metric, summarize
from fedlora.rounds import Workbench
from fedlora.simulation import Runner, RunOutcome, build_federation
from fedlora.strategies import REGISTRY


def run_experiment(cfg: RunConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg.strategy`` on its federation; write the run folder ``out``; return the summary."""
    start = time.perf_counter()
    fed = build_federation(cfg)
    writer = RunWriter(out, to_dict(cfg))
    runner = Runner(fed, out, progress=progress)
    outcome = runner.run(lambda record: writer.record(record.to_json()))
    clients = [
        {"id": c.cid, "rank": c.rank, "alpha": c.alpha, "examples": len(c.examples)}
        for c in fed.clients
    ]
    facts = {"heldout_examples": len(fed.heldout), "device": str(fed.loaded.device)}
    return finish_run(cfg, writer, outcome, runner.bench, clients, facts, start)


def finish_run(
    cfg: RunConfig,
    writer: RunWriter,
    outcome: RunOutcome,
    bench: Workbench,
    clients: list[dict[str, Any]],
    facts: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    """Export the global adapter (and merged model), summarise, write the report; any engine."""
    extra: dict[str, Any] = {"clients": clients, **facts, "model": cfg.model.name}
    if outcome.export:
        folder = adapters.export_adapter(
            bench.model, outcome.export, cfg.model.targets, writer.out / "adapter"
        )
        extra["adapter"] = str(folder)
        extra["adapter_ranks"] = sorted({f.rank for f in outcome.export.values()})
        if outcome.export_error is not None:
            extra["adapter_relative_error"] = outcome.export_error
    if cfg.save_merged:
        extra["merged_model"] = str(save_merged(bench, outcome.export, writer.out / "merged", cfg))
    extra["seconds"] = time.perf_counter() - start
    metric = headline_metric(bench.kind, cfg.eval.rouge_samples > 0)
    summary = summarize(cfg.strategy, bench.kind, metric, writer.rows, extra)
    return writer.finish(summary)


def save_merged(bench: Workbench, export: Any, folder: Path, cfg: RunConfig) -> Path:
    """The full model with the global update merged (FLoRA's is already in the base)."""
    model = bench.model
    merged_already = cfg.strategy in REGISTRY and REGISTRY[cfg.strategy].traits.merges_into_base
    if export and not merged_already:
        adapters.merge_delta(model, export)
    model.save_pretrained(str(folder))
    bench.tokenizer.save_pretrained(str(folder))
    return folder


def compare_strategies(
    cfg: RunConfig, strategies: list[str], out: Path, progress: bool = True
) -> tuple[dict[str, dict[str, Any]], str]:
    """Run every strategy on the same config and seed (so identical partitions, ranks and client
    samples), each in ``out/NAME``; write ``compare.md/json/png`` in ``out``."""
    summaries = {}
    for name in strategies:
        run_cfg = dataclasses.replace(cfg, strategy=name)
        summaries[name] = run_experiment(run_cfg, out / name, progress=progress)
    return summaries, comparison(summaries, out)

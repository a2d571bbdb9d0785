"""A run from config to run folder, and a comparison of strategies on identical federations.

``run_experiment`` reads top to bottom: set up → rounds → export → report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedlora import adapters
from fedlora.checkpoint import load_checkpoint, save_checkpoint
from fedlora.config import RunConfig, config_from_json, to_dict
from fedlora.devices import device_of
from fedlora.errors import ConfigError
from fedlora.federation import build_federation
from fedlora.models import load_configured, published_name
from fedlora.precision import MergedBase, dtype_name
from fedlora.privacy import privacy_summary
from fedlora.report import RunWriter, comparison, headline_metric, model_card, summarize
from fedlora.rounds import OnRound, PartyModel, RoundRecord, RunOutcome, Snapshot


def run_experiment(
    cfg: RunConfig, out: Path, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Run ``cfg.strategy`` on its federation; write the run folder ``out`` (with a checkpoint
    after every round); return the summary. ``resume``: continue ``out`` from its checkpoint."""
    from fedlora.simulation import Runner  # the in-process engine; Flower's serve() is the other

    start = time.perf_counter()
    snapshot = resume_point(cfg, out) if resume else None
    fed = build_federation(cfg)
    writer = RunWriter(out, to_dict(cfg), snapshot[1]["rows"] if snapshot else ())
    runner = Runner(fed, out, progress=progress)
    outcome = runner.run(checkpointing(writer, cfg), resume=snapshot)
    clients = [
        {"id": c.cid, "rank": c.rank, "alpha": c.alpha, "examples": len(c.examples)}
        for c in fed.clients
    ]
    facts = {
        "heldout_examples": len(fed.heldout),
        "device": str(fed.loaded.device),
        # every client trains on the server's model, or a quantized one on the same device
        "client_devices": [str(device_of(fed.loaded.model))],
    }
    return finish_run(cfg, writer, outcome, runner.party, clients, facts, start)


def checkpointing(writer: RunWriter, cfg: RunConfig) -> OnRound:
    """After each round: its row in ``metrics.jsonl`` (with ``[privacy]`` noise, ``epsilon``: the
    largest ε of any client so far, from the rows' participants), then the checkpoint (with every
    row and the config, so a resume can check it continues the same run)."""
    p = cfg.privacy

    def on_round(record: RoundRecord, snapshot: Snapshot) -> None:
        row = record.to_json()
        if record.round > 0 and p.clip_norm > 0 and p.noise_multiplier > 0:
            row["epsilon"] = privacy_summary(p, [*writer.rows, row])["epsilon_max"]
        writer.record(row)
        tensors, meta = snapshot
        save_checkpoint(writer.out, tensors, {**meta, "rows": writer.rows, "config": to_dict(cfg)})

    return on_round


def resume_point(cfg: RunConfig, out: Path) -> Snapshot:
    """``out``'s checkpoint, checked to belong to a run of ``cfg``."""
    tensors, meta = load_checkpoint(out)
    if meta.get("config") != json.loads(json.dumps(to_dict(cfg))):
        raise ConfigError(
            f"the checkpoint in {out} is of a run with another configuration; resume it with "
            "its own config (fedlora run --resume RUN_DIR reads RUN_DIR/config.json)"
        )
    return tensors, meta


def resume_experiment(out: Path, progress: bool = True) -> dict[str, Any]:
    """Continue the run folder ``out`` from its last checkpoint, with its own config."""
    return run_experiment(run_config_of(out), out, progress, resume=True)


def run_config_of(out: Path) -> RunConfig:
    """The config a run folder was run with (``out/config.json``)."""
    path = out / "config.json"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"{out} is not a run folder: {path} cannot be read ({exc.strerror})"
        ) from None
    return config_from_json(text, str(path))


def finish_run(
    cfg: RunConfig,
    writer: RunWriter,
    outcome: RunOutcome,
    party: PartyModel,
    clients: list[dict[str, Any]],
    facts: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    """Export the global adapter (and merged model), summarise, write the report; any engine."""
    extra: dict[str, Any] = {
        "clients": clients,
        **facts,
        "model": cfg.model.name,
        "dtype": dtype_name(party.model.dtype),
        "eval_split": cfg.eval.split,
        "targets": adapters.resolve_targets(party.model, cfg.model.targets),
    }
    folder = None
    if outcome.export:
        base_name = published_name(cfg.model.name)
        folder = adapters.export_adapter(
            party.model, outcome.export, cfg.model.targets, writer.out / "adapter", base_name
        )
        extra["adapter"] = str(folder)
        extra["adapter_ranks"] = sorted({f.rank for f in outcome.export.values()})
        if outcome.export_error is not None:
            extra["adapter_relative_error"] = outcome.export_error
    if cfg.save_merged:
        merge = outcome.export if outcome.unmerged is None else outcome.unmerged
        extra["merged_model"] = str(save_merged(party, merge, writer.out / "merged"))
    if cfg.privacy.clip_norm > 0:
        extra["privacy"] = privacy_summary(cfg.privacy, writer.rows)
    extra["seconds"] = time.perf_counter() - start
    metric = headline_metric(party.kind, cfg.eval.rouge_samples > 0)
    summary = summarize(cfg.label, party.kind, metric, writer.rows, extra)
    if folder is not None:
        card = model_card(to_dict(cfg), summary, published_name(cfg.model.name))
        (folder / "README.md").write_text(card)
    return writer.finish(summary)


def save_merged(party: PartyModel, unmerged: Any, folder: Path) -> Path:
    """The full model with the global update merged (``unmerged``: what the base weights do not
    hold yet; FLoRA's update is already in them), saved in float32 with ``W₀ + Σ_t ΔW_t`` in
    each merged weight: whatever the compute dtype, no part of the update is rounded away."""
    if unmerged:
        party.merge(unmerged)
    return _save_full(party.model, party.tokenizer, party.base, folder)


def _save_full(model: Any, tokenizer: Any, base: MergedBase, folder: Path) -> Path:
    config = model.config
    compute = config.dtype
    config.dtype = torch.float32
    try:
        model.save_pretrained(str(folder), state_dict=base.float32_state_dict())
    finally:
        config.dtype = compute
    tokenizer.save_pretrained(str(folder))
    return folder


def export_merged(run: Path, folder: Path) -> Path:
    """The full model of a finished run folder ``run``: its base model with the run's exported
    adapter (``run/adapter``, read from safetensors) merged, saved in float32 like
    ``save_merged``. A ConfigError, before the model loads, when the run has no adapter."""
    cfg = run_config_of(run)
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"{run} has no global adapter ({adapter}/adapter_config.json): the run has not "
            "finished, or its strategy exports none (standalone)"
        )
    factors = adapters.read_adapter(adapter)
    loaded = load_configured(cfg.model, cfg.seed)
    base = MergedBase(loaded.model)
    base.merge(factors)
    return _save_full(loaded.model, loaded.tokenizer, base, folder)


def compare_strategies(
    cfg: RunConfig,
    strategies: list[str],
    out: Path,
    progress: bool = True,
    run: Callable[[RunConfig, Path], dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, Any]], str]:
    """Run every strategy on the same config and seed (so identical partitions, ranks and client
    samples), each in ``out/NAME``; write ``compare.md/json/png`` in ``out``. ``run`` runs one
    config into one folder and returns its summary (default: in-process; the CLI passes Flower's
    for ``--engine flower``)."""
    summaries = {}
    for name in strategies:
        run_cfg = cfg.running(name)
        if run is None:
            summaries[name] = run_experiment(run_cfg, out / name, progress=progress)
        else:
            summaries[name] = run(run_cfg, out / name)
    return summaries, comparison(summaries, out)

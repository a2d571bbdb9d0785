"""fedlora's Flower ``ServerApp`` and what its ``ClientApp`` runs (Flower's Message API).

The server side is :class:`fedlora.rounds.FederatedRounds`, the client side
:meth:`fedlora.rounds.PartyModel.train`, exactly as in the in-process runner; this module only
turns their plans and results into Flower messages and back (:mod:`fedlora.flower.records`).
The ``ClientApp`` itself is :mod:`fedlora.flower.client`, light to import: it runs
:func:`node_handle` here, or hands the message to the node's model keeper
(:mod:`fedlora.flower.node`), which runs the same function.

Both apps read the run's configuration from the Flower run config: ``fedlora-config`` (the
resolved fedlora config as JSON; its ``[flower]`` section says how long the server waits for
nodes and for a round's replies) and ``out`` (the run folder on the server's host). A node says
who it is in its node
config: ``partition-id`` (required: which client it is), and optionally ``rank``, ``alpha``,
``data`` (a data file of its own, used whole, instead of its partition of ``data.source``),
``quantization`` (``none``, ``8bit`` or ``4bit``: how this node holds its frozen base; default:
``clients.quantization`` for its partition-id), ``device`` (where this node's model lives, e.g.
``cuda:1``; default: ``model.device``; a local deployment gives each node one,
:func:`fedlora.flower.launch.deployment_devices`), ``threads`` (the CPU threads this node's torch
computes with, :func:`node_threads`; default: torch's own, every core; a local deployment shares
the machine's cores among its nodes), ``keep-model`` (true: keep the loaded model
between messages, :mod:`fedlora.flower.node`), ``trust-server`` (true: train on the server's
``data.source`` and take its privacy settings as they are; :func:`trusts_server`) and
``dp-clip-norm`` / ``dp-noise-multiplier`` (the node's own privacy, :func:`node_view`). A
node's reply to ``train`` says the device it trained on and, on CUDA, the peak memory its
training took; the summary's ``client_devices`` lists the devices, ``client_peak_memory_mb``
each client's largest peak.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora import devices
from fedlora.config import ModelConfig, RunConfig, config_from_json, to_dict
from fedlora.data import TaskKind, load_examples
from fedlora.errors import ConfigError, UpdateError
from fedlora.flower import CONFIG_KEY, OUT_KEY, RESUME_KEY, trusts_server
from fedlora.flower.records import (
    array_part,
    content_plan,
    factors_record,
    record_deltas,
    result_content,
)
from fedlora.flower.strategy import FedLoRA, check_flower, server_data
from fedlora.lora import BaseDelta, LoRAFactors
from fedlora.models import QUANTIZATIONS, LoadedModel, load_configured
from fedlora.precision import MergedBase
from fedlora.privacy import withholds
from fedlora.ranks import client_ranks
from fedlora.report import RunWriter
from fedlora.rounds import (
    Client,
    PartyModel,
    RoundRecord,
)
from fedlora.weighting import client_id

server_app = ServerApp()


def _run_value(context: Context, key: str) -> Any:
    if key not in context.run_config:
        raise ConfigError(f"the Flower run config has no {key!r}; write the app with fedlora")
    return context.run_config[key]


# --- server ---------------------------------------------------------------------------------


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = config_from_json(str(_run_value(context, CONFIG_KEY)), f"run config {CONFIG_KEY!r}")
    resume = bool(context.run_config.get(RESUME_KEY, False))
    serve(grid, cfg, Path(str(_run_value(context, OUT_KEY))), resume)


def serve(grid: Grid, cfg: RunConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` over the nodes of ``grid``; write the run folder ``out`` as ``fedlora run``
    does; return the summary. ``resume``: go on from ``out``'s checkpoint (written by either
    engine). The nodes of a new Flower run hold no merged updates, so each is sent all of them
    with its first task."""
    from fedlora.experiment import checkpointing, finish_run, resume_point

    start = time.perf_counter()
    check_flower(cfg, resume)
    snapshot = resume_point(cfg, out) if resume else None
    strategy = FedLoRA(cfg)
    rounds = strategy.join(grid)
    assert strategy.loaded is not None and strategy.data is not None
    loaded, data, examples = strategy.loaded, strategy.data, strategy.examples
    clients, node_of = strategy.clients, strategy.node_of
    writer = RunWriter(out, to_dict(cfg), snapshot[1]["rows"] if snapshot else ())
    if snapshot is not None:
        print(f"fedlora: resuming after round {snapshot[1]['round']}", flush=True)

    def echo(record: RoundRecord) -> None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in record.metrics.items())
        failed = f", {len(record.failed)} failed" if record.failed else ""
        print(
            f"fedlora: round {record.round}/{cfg.rounds} done ({len(record.clients)} clients"
            f"{failed}) {metrics}",
            flush=True,
        )

    outcome = rounds.drive(
        lambda tasks: strategy.exchange(grid, tasks),
        checkpointing(writer, cfg),
        snapshot,
        clients_hold_nothing=True,  # the nodes of a new Flower run hold no merged updates
        after=echo,
    )
    info = [
        {"id": c.cid, "rank": c.rank, "alpha": c.alpha, "examples": examples[c.cid]}
        for c in clients
    ]
    facts = {
        "heldout_examples": len(data.heldout),
        "device": str(loaded.device),
        "client_devices": sorted(strategy.trained_on),
        "client_peak_memory_mb": dict(sorted(strategy.peak_memory_mb.items())),
        "engine": "flower",
        "nodes": {c.cid: node_of[c.cid] for c in clients},
    }
    summary = finish_run(cfg, writer, outcome, rounds.party, info, facts, start)
    print(f"fedlora: run folder {out}", flush=True)
    return summary


# --- client ---------------------------------------------------------------------------------


def node_handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """A node's reply content to a ``query`` or ``train`` message (what the ClientApp, or the
    node's model keeper, runs)."""
    if kind == "query":
        return node_query(context)
    if kind == "train":
        return node_train(content, context)
    raise ConfigError(f"unknown message kind {kind!r}: expected 'query' or 'train'")


def node_query(context: Context) -> RecordDict:
    """Who this node is: its client id, partition, rank, α and, unless it is private
    (:func:`fedlora.privacy.withholds`), its example count."""
    cfg = node_view(_config(context), context.node_config)
    client, _ = node_client(cfg, context.node_config)
    node_threads(context.node_config)  # a bad value fails the join, not the first round
    record = ConfigRecord(
        {
            "cid": client.cid,
            "index": client.index,
            "rank": client.rank,
            "alpha": float(client.alpha),
        }
    )
    if not withholds(cfg.privacy):
        record["examples"] = len(client.examples)
    return RecordDict({"client": record})


def node_train(content: RecordDict, context: Context) -> RecordDict:
    """Train this node's client on the plan in ``content``, on the base as merged so far."""
    cfg = node_view(_config(context), context.node_config)
    client, party = node_party(cfg, context.node_config)
    plan, t, base = content_plan(content)
    rebuild_base(context, base, party.base, party.shapes)
    devices.reset_peak_memory(party.device)
    result = party.train(client, plan, t, state=NodeState(context))
    peak = devices.peak_memory_mb(party.device)
    if withholds(cfg.privacy):  # its loss is None already; its count and peak stay here too
        result, peak = dataclasses.replace(result, num_examples=None), None
    return result_content(result, device=str(party.device), peak_memory_mb=peak)


class NodeState:
    """A node's own :class:`fedlora.clients.ClientState`: one record of its ``context.state``,
    which Flower keeps on the node for the run (a new Flower run, a resumed one included, starts
    without it)."""

    KEY = "client.own"

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> dict[str, LoRAFactors] | None:
        if self.KEY not in self.context.state.array_records:
            return None
        deltas = record_deltas(array_part(self.context.state, self.KEY, "node state"), "node")
        return {m: d for m, d in deltas.items() if isinstance(d, LoRAFactors)}

    def save(self, factors: dict[str, LoRAFactors]) -> None:
        self.context.state[self.KEY] = factors_record(factors)


def _config(context: Context) -> RunConfig:
    return _config_cached(str(_run_value(context, CONFIG_KEY)))


@functools.lru_cache(maxsize=2)
def _config_cached(text: str) -> RunConfig:
    return config_from_json(text, f"run config {CONFIG_KEY!r}")


def node_view(cfg: RunConfig, node_config: Mapping[str, Any]) -> RunConfig:
    """The run config as this node applies it. A node that does not :func:`trusts_server`
    keeps its own privacy: ``dp-clip-norm`` (its clip norm C, whatever the server says, so the
    server cannot switch clipping off) and ``dp-noise-multiplier`` (a floor on σ: the larger of
    the server's and its own), and refuses ``privacy.noise_seed`` (whoever knows the seed can
    subtract the noise)."""
    if trusts_server(node_config):
        return cfg
    p = cfg.privacy
    if p.noise_seed is not None:
        raise ConfigError(
            "the server set privacy.noise_seed, which would let it subtract this node's noise; "
            "this node refuses it (node config trust-server=true accepts it)"
        )
    clip, sigma = node_config.get("dp-clip-norm"), node_config.get("dp-noise-multiplier", 0.0)
    for key, value in (("dp-clip-norm", clip), ("dp-noise-multiplier", sigma)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
        ):
            raise ConfigError(f"node config {key} must be a number >= 0, got {value!r}")
    own = dataclasses.replace(
        p,
        clip_norm=p.clip_norm if clip is None else float(clip),
        noise_multiplier=max(p.noise_multiplier, float(sigma)),
    )
    return cfg if own == p else dataclasses.replace(cfg, privacy=own)


def node_client(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[Client, TaskKind]:
    """The client a node is, from its node config (see the module docstring) and ``cfg``, and
    the kind of its data."""
    if "partition-id" not in node_config:
        raise ConfigError(
            "the node config has no partition-id; start the SuperNode with "
            '--node-config "partition-id=K" (K = 0 … clients.num_clients - 1)'
        )
    index = node_config["partition-id"]
    n = cfg.clients.num_clients
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ConfigError(f"node config partition-id must be an int in 0 … {n - 1}, got {index!r}")
    rank = node_config.get("rank")
    if rank is None:
        rank = client_ranks(cfg.clients.ranks, n, cfg.clients.rank_set, cfg.seed)[index]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"node config rank must be an int >= 1, got {rank!r}")
    alpha = float(node_config.get("alpha") or cfg.clients.alpha_for(rank))
    kind: TaskKind
    if "data" in node_config:
        examples, kind = load_examples(
            str(node_config["data"]),
            kind=cfg.data.kind,
            columns=cfg.data.columns,
            limit=None,
            seed=cfg.seed,
        )
    elif not trusts_server(node_config):
        raise ConfigError(
            "this node names no data of its own and does not let the server choose it: give it "
            "node config data=PATH (its own file), or trust-server=true to train on its "
            "partition of the server's data.source"
        )
    else:
        data = server_data(json.dumps(to_dict(cfg)))
        examples, kind = data.parts[index], data.kind
    return Client(client_id(index), index, rank, alpha, list(examples)), kind


def node_device(cfg: RunConfig, node_config: Mapping[str, Any]) -> str:
    """Where a node's model lives: its node config's ``device`` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``) when it has one, else the run's ``model.device``. Resolved, and refused if not
    on this host, when the model loads."""
    device = node_config.get("device", cfg.model.device)
    if not isinstance(device, str) or not device:
        raise ConfigError(
            f"node config device must be a device name (auto, cpu, cuda[:N]), got {device!r}"
        )
    return device


@functools.lru_cache(maxsize=1)
def _loaded(
    cfg_model: str, seed: int, quantization: str = "none"
) -> tuple[LoadedModel, MergedBase]:
    """The model of ``cfg_model`` (a run's ``[model]`` settings as JSON) in the node's
    ``quantization``, once per process, with its merged base (which keeps the pristine weights,
    or, quantized, every merged update beside them)."""
    loaded = load_configured(ModelConfig(**json.loads(cfg_model)), seed, quantization)
    return loaded, MergedBase(loaded.model)


def model_loads() -> int:
    """How many times this process has loaded a model (``node_party`` keeps it)."""
    return _loaded.cache_info().misses


def node_party(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[Client, PartyModel]:
    """What a ClientApp process sets up before it trains: the node's client (its data) and a
    party model on the model (loaded once per process; Flower's deployment starts a new process
    for every message, its simulation engine keeps them)."""
    client, kind = node_client(cfg, node_config)
    threads = node_threads(node_config)
    if threads is not None:
        torch.set_num_threads(threads)
    model = dataclasses.replace(cfg.model, device=node_device(cfg, node_config))
    settings = json.dumps(dataclasses.asdict(model), sort_keys=True)
    quantization = node_quantization(cfg, node_config, client.index)
    loaded, base = _loaded(settings, cfg.seed, quantization)
    return client, PartyModel(loaded.model, loaded.tokenizer, cfg, kind, progress=False, base=base)


def node_threads(node_config: Mapping[str, Any]) -> int | None:
    """The CPU threads a node's torch computes with: its node config's ``threads``, or None
    (torch's default: a thread per core). Nodes that share a machine should share its cores:
    each on every core, they slow each other down far more than they gain."""
    threads = node_config.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise ConfigError(f"node config threads must be an int >= 1, got {threads!r}")
    return threads


def node_quantization(cfg: RunConfig, node_config: Mapping[str, Any], index: int) -> str:
    """How node ``index`` holds its frozen base: its node config's ``quantization``, else
    ``clients.quantization`` (``none``, ``8bit`` or ``4bit``)."""
    quantization = node_config.get("quantization", cfg.clients.quantization_of(index))
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"node config quantization must be one of {', '.join(QUANTIZATIONS)}, got "
            f"{quantization!r}"
        )
    return str(quantization)


def received_base(context: Context) -> list[dict[str, BaseDelta]]:
    """The merged base updates this node holds, in order; a gap is an error."""
    keys = sorted(int(k.split(".", 1)[1]) for k in context.state if k.startswith("base."))
    if keys != list(range(len(keys))):
        raise UpdateError(f"this node holds merged updates {keys}, expected 0 … {len(keys) - 1}")
    return [
        record_deltas(array_part(context.state, f"base.{i}", "node state"), "node state")
        for i in keys
    ]


def rebuild_base(
    context: Context,
    sent: Mapping[int, dict[str, BaseDelta]],
    base: MergedBase,
    names: Iterable[str],
) -> None:
    """Keep the merged updates a ``train`` message ``sent`` (by position) in the node's state
    with those it received before, then put the weights of modules ``names`` back to the
    pristine base and merge every one in order (the server merged the same updates in the same
    order with the same float32 arithmetic, so both hold the same base, bitwise)."""
    for i, delta in sent.items():
        context.state[f"base.{i}"] = factors_record(delta)
    deltas = received_base(context)
    base.reset(list(names))
    for delta in deltas:
        base.merge(delta)

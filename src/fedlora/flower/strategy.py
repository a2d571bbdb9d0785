"""A fedlora method as a Flower strategy: :class:`FedLoRA` is a
``flwr.serverapp.strategy.Strategy`` (Flower 1.42's Message API), for any Flower ``ServerApp``.

``FedLoRA(cfg)`` runs ``cfg.strategy`` (any fedlora method: FLoRA, FlexLoRA, HAFL, …) with
heterogeneous ranks. Its server side is :class:`fedlora.rounds.FederatedRounds`, the one every
fedlora engine runs; this module turns its plans into Flower messages and the nodes' replies back
(:mod:`fedlora.flower.records`), with the same checks. fedlora's own ``ServerApp``
(:func:`fedlora.flower.apps.serve`) uses the same class: it adds resuming, retries within a round
and the run folder.

- **Joining** (the first :meth:`FedLoRA.configure_train`): it waits for
  ``clients.num_clients`` nodes and sends each a ``query`` message; a node answers which client
  it is (its ``partition-id``, rank, α and, unless private, example count:
  :func:`fedlora.flower.apps.node_query`, which fedlora's ClientApp runs, or
  :func:`fedlora.flower.client_side.identity` in a ClientApp of one's own). The server loads its
  own copy of the model (merged into, evaluated on ``data.heldout``).
- **A round**: :meth:`FedLoRA.configure_train` samples the clients and sends each a ``train``
  message with its plan (its rank's start, frozen components, the merged base updates it has not
  received, the method's options) and the ``config`` record Flower passes in (a DP wrapper's
  clipping norm, …) as ``config``; :meth:`FedLoRA.aggregate_train` checks every reply (keys,
  shapes, dtype, sizes, norms: a malformed or hostile reply fails its client, never the round),
  aggregates with the method's rule, merges and evaluates on the server's held-out set. It
  returns the global adapter (:meth:`fedlora.rounds.FederatedRounds.export`, ``{module}.A`` and
  ``{module}.B``) and the round's metrics. The method's exact state stays in the strategy: the
  ``arrays`` Flower passes back in are only checked to be what it returned (the first round's
  must be empty: a method starts from the base model).
- **Evaluation** is the server's own, every ``eval.every`` rounds: :meth:`configure_evaluate`
  sends nothing.
- **Every message** carries the run's config (record ``fedlora``), so a ClientApp of one's own
  needs none: :mod:`fedlora.flower.client_side` trains by it.
- **Wrappers**: Flower's DP wrappers noise the arrays :meth:`aggregate_train` returns, which the
  method does not train from; :func:`check_unwrapped` refuses them (and any change to those
  arrays between rounds) with why, and names fedlora's client-level privacy instead.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlora.config import SINGLE_PARTY, RunConfig, config_from_json, to_dict
from fedlora.errors import ConfigError, FedloraError, UpdateError
from fedlora.federation import FederationData, federation_data, server_party, server_rounds
from fedlora.flower import FEDLORA_RECORD
from fedlora.flower.records import (
    config_part,
    content_device,
    content_peak_memory,
    content_result,
    factors_record,
    positive_alpha,
    task_content,
)
from fedlora.lora import Expected
from fedlora.methods import hook_for
from fedlora.models import LoadedModel, load_configured
from fedlora.rounds import (
    ClientInfo,
    Failure,
    FederatedRounds,
    LocalResult,
    OnRound,
    RoundRecord,
    Task,
)
from fedlora.weighting import client_id

log = logging.getLogger("fedlora")

CONFIG_RECORD = "config"
"""The key of the ``config`` record Flower passes to :meth:`FedLoRA.configure_train` in each
``train`` message (what a ClientApp reads as ``msg.content["config"]``)."""


def check_flower(cfg: RunConfig, resume: bool = False) -> None:
    """Refuse what cannot run on Flower, before any process starts: the single-party reference
    points, and resuming a method whose clients keep state on the nodes."""
    if resume and hook_for(cfg.strategy).keeps_state:
        raise ConfigError(
            f"strategy {cfg.strategy!r} keeps client state on the nodes, which a new Flower run "
            "starts without; a resumed run would not continue the same clients (run it again, "
            "or in-process, where each client's state is a file of the run folder)"
        )
    if cfg.mode in SINGLE_PARTY:
        raise ConfigError(
            f"mode {cfg.mode!r} is a single-party reference point; run it in-process "
            "(fedlora run without --engine flower)"
        )


class FedLoRA(Strategy):
    """The fedlora method ``cfg.strategy`` as a Flower strategy (module docstring).

    ``cfg``: a fedlora run config (``fedlora.config.load_config``, or
    ``config_from_json``); the ``[flower]`` section says how long to wait for nodes
    (``wait_nodes_s``). ``on_round(record, snapshot)``: called after round 0 (the base model's
    metrics) and after every round, with the round's :class:`fedlora.rounds.RoundRecord` and
    the state to resume from (:mod:`fedlora.checkpoint`); :attr:`records` keeps the records.
    ``loaded``: the server's model, if the app has already loaded it (else it is loaded from
    ``cfg.model`` when the nodes have joined)."""

    def __init__(
        self,
        cfg: RunConfig,
        on_round: OnRound | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        check_flower(cfg)
        self.cfg = cfg
        self.on_round = on_round
        self.loaded = loaded
        self.rounds: FederatedRounds | None = None
        """The server side, once the nodes have joined (:meth:`join`)."""
        self.clients: list[ClientInfo] = []
        self.node_of: dict[str, int] = {}
        """Each client's node id."""
        self.examples: dict[str, int] = {}
        """Each client's example count, fixed when it joined."""
        self.data: FederationData | None = None
        self.records: list[RoundRecord] = []
        self.trained_on: set[str] = set()
        """The devices the nodes said they trained on."""
        self.peak_memory_mb: dict[str, float] = {}
        """Each client's largest peak device memory (MiB) over the rounds, as its node reported
        it (nodes on CUDA that are not private)."""
        self._tasks: list[Task] = []
        self._returned: ArrayRecord | None = None
        """The global adapter :meth:`aggregate_train` returned last."""
        self._config_json = json.dumps(to_dict(cfg), sort_keys=True)

    # --- Flower's Strategy ----------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Round ``server_round``'s ``train`` messages, one per sampled client (joining the nodes
        and recording round 0 first, the first time)."""
        check_unwrapped(config, arrays, self._returned)
        rounds = self.join(grid)
        if not self.records:
            self._record(rounds.flagging(rounds.start()), rounds)
        rounds.begin()
        self._tasks = rounds.tasks(server_round)
        return self.messages(self._tasks, config)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's replies screened and aggregated by the method (a client whose reply is
        missing, failed or malformed fails alone); the global adapter and the round's metrics.
        With fewer than ``clients.min_clients`` good replies the round is skipped (its record
        says why) and the state kept."""
        rounds = self._joined()
        tasks = self._tasks
        if not tasks or tasks[0].round != server_round:
            raise FedloraError(f"aggregate_train of round {server_round}, never configured")
        by_node = {reply.metadata.src_node_id: reply for reply in replies}
        contents: list[RecordDict | Failure] = []
        for task in tasks:
            reply = by_node.get(self.node_of[task.client.cid])
            if reply is None:
                contents.append(Failure("no reply within the round's time-out"))
            elif reply.has_error():
                contents.append(Failure(f"its node failed: {reply.error.reason}"))
            else:
                contents.append(reply.content)
        failed: dict[str, str] = {}
        record = rounds.conclude(tasks, self.results(tasks, contents), failed)
        if record is None:
            need = self.cfg.clients.min_clients
            reason = f"fewer than clients.min_clients = {need} clients delivered"
            record = rounds.skipped(server_round, failed, 1, reason)
        self._record(rounds.close(record), rounds)
        factors, _ = rounds.export()
        self._returned = factors_record(factors)
        return self._returned, MetricRecord(round_metrics(record))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing: the server evaluates the global model itself (``eval.every``)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (:meth:`configure_evaluate` sends no message)."""
        return None

    def summary(self) -> None:
        """Log the method and its settings."""
        c = self.cfg.clients
        log.info("\t├──> fedlora method: %s", self.cfg.strategy)
        log.info("\t├── clients: %d, %.0f %% a round", c.num_clients, 100 * c.fraction)
        log.info("\t└── weighting: %s", self.cfg.weighting)

    def save_adapter(self, folder: Path) -> Path:
        """Write the global result (:meth:`fedlora.rounds.FederatedRounds.export`: for a method
        that merges into the base, every merged update with the global adapter) as a PEFT
        adapter folder that ``PeftModel.from_pretrained`` loads on the base model."""
        from fedlora import adapters
        from fedlora.models import published_name

        rounds = self._joined()
        factors, _ = rounds.export()
        model = rounds.party.model
        base_name = published_name(self.cfg.model.name)
        return adapters.export_adapter(model, factors, self.cfg.model.targets, folder, base_name)

    # --- the pieces fedlora's own ServerApp shares -------------------------------------------

    def join(self, grid: Grid) -> FederatedRounds:
        """Wait for ``clients.num_clients`` nodes, ask each which client it is, load the server's
        model and held-out set, and build the server side (once; later calls return it)."""
        if self.rounds is not None:
            return self.rounds
        cfg = self.cfg
        wait_s = cfg.flower.wait_nodes_s
        nodes = wait_for_nodes(grid, cfg.clients.num_clients, wait_s)
        query = RecordDict({FEDLORA_RECORD: self.config_record()})
        clients, node_of, examples, claims = identify(grid, nodes, cfg, wait_s, query)
        loaded = self.loaded = self.loaded or load_configured(cfg.model, cfg.seed)
        data = self.data = server_data(json.dumps(to_dict(cfg)))
        party = server_party(cfg, loaded, data.heldout, data.kind, False, data.scored)
        params = sum(p.numel() for p in loaded.model.parameters())
        rounds = server_rounds(cfg, clients, party, params)
        for c in clients:  # a private node sent no count: the partition the server made its slot
            examples.setdefault(c.cid, len(data.parts[c.index]))
        rounds.examples.update(examples)  # each node's count, fixed when it joined
        for cid, claim in claims.items():
            rounds.flag(cid, claim)
        rounds.assigned = {  # the nodes that train on the partition this server made them
            c.cid for c in clients if examples[c.cid] == len(data.parts[c.index])
        }
        self.clients, self.node_of, self.examples = clients, node_of, examples
        self.rounds = rounds
        return rounds

    def messages(self, tasks: Sequence[Task], config: ConfigRecord | None = None) -> list[Message]:
        """Each task as a ``train`` message to its node, with ``config`` (if any) as
        :data:`CONFIG_RECORD`."""
        out = []
        for task in tasks:
            content = task_content(task)
            content[FEDLORA_RECORD] = self.config_record()
            if config is not None:
                content[CONFIG_RECORD] = config
            node = self.node_of[task.client.cid]
            out.append(Message(content, node, "train", group_id=str(task.round)))
        return out

    def results(
        self, tasks: Sequence[Task], contents: Sequence[RecordDict | Failure]
    ) -> list[LocalResult | Failure]:
        """Per task, its reply's result, or why there is none (its node failed, did not answer,
        or sent a malformed reply: every array checked against the model's shapes and the
        task's rank before it is decoded). The devices the nodes say they trained on go to
        :attr:`trained_on`, their peak memory to :attr:`peak_memory_mb`."""
        shapes = self._joined().shapes
        out: list[LocalResult | Failure] = []
        for task, content in zip(tasks, contents, strict=True):
            out.append(result_of(task, content, shapes, self.trained_on, self.peak_memory_mb))
        return out

    def config_record(self) -> ConfigRecord:
        """The run's config as every message carries it (:data:`FEDLORA_RECORD`): what a node
        that runs :mod:`fedlora.flower.client_side` trains by."""
        return ConfigRecord({"config": self._config_json})

    def exchange(self, grid: Grid, tasks: Sequence[Task]) -> list[LocalResult | Failure]:
        """Send ``tasks`` and wait up to ``flower.round_timeout_s`` for the replies
        (:func:`send`): fedlora's own ServerApp, which may try a round again."""
        names = [task.client.cid for task in tasks]
        replies = send(grid, self.messages(tasks), self.cfg.flower.round_timeout_s, names)
        return self.results(tasks, replies)

    def _joined(self) -> FederatedRounds:
        if self.rounds is None:
            raise FedloraError("no node has joined yet: configure_train runs first")
        return self.rounds

    def _record(self, record: RoundRecord, rounds: FederatedRounds) -> None:
        self.records.append(record)
        if self.on_round is not None:
            self.on_round(record, rounds.snapshot())


DP_WRAPPERS = (
    "Flower's differential-privacy wrappers cannot wrap FedLoRA: they clip the difference "
    "between the one ArrayRecord a train message carries and the one its reply carries (a "
    "fedlora client replies at its own rank, with factors whose shapes differ from the global "
    "adapter's), and they add noise to the arrays aggregate_train returns, which FedLoRA does "
    "not train from (each method keeps its own exact state: FLoRA's merged updates, for one), so "
    "the noise would never reach the clients and the run would not be private. Use "
    "fedlora's client-level privacy instead: [privacy] clip_norm and noise_multiplier in the "
    "run's config (each client clips its update and adds Gaussian noise before its reply leaves "
    "it; a node's own node config dp-clip-norm / dp-noise-multiplier holds whatever the server "
    "says), for every method whose reply is its factors alone"
)
"""Why :func:`check_unwrapped` refuses a DP wrapper (docs/flower.md says it too)."""


def check_unwrapped(
    config: ConfigRecord, arrays: ArrayRecord, returned: ArrayRecord | None
) -> None:
    """Refuse initial ``arrays`` (the first round's; a method starts from the base model), and
    a round that a strategy wrapper has changed under FedLoRA: a ``config`` that
    carries Flower's DP clipping norm (``DifferentialPrivacyClientSideFixedClipping``), or
    ``arrays`` passed back that differ from the global adapter FedLoRA ``returned`` last round
    (a wrapper that noises or clips them: FedLoRA trains from its own exact state, so the
    change would not reach the clients)."""
    if KEY_CLIPPING_NORM in config:
        raise ConfigError(DP_WRAPPERS)
    if returned is None:
        if len(arrays):
            raise ConfigError(
                f"FedLoRA.start was given initial_arrays ({len(arrays)} arrays, e.g. "
                f"{next(iter(arrays))!r}); every fedlora method starts from the base model with "
                "fresh adapters, so they would be ignored: pass ArrayRecord() (to start from a "
                "trained adapter, merge it into the base model and name that model)"
            )
        return
    same = list(arrays.keys()) == list(returned.keys()) and all(
        arrays[key].numpy().tobytes() == returned[key].numpy().tobytes() for key in returned
    )
    if not same:
        raise ConfigError(
            "the global adapter passed back to FedLoRA.configure_train differs from the one "
            "its aggregate_train returned: a wrapper changed it. " + DP_WRAPPERS
        )


def round_metrics(record: RoundRecord) -> dict[str, int | float | list[int] | list[float]]:
    """A round's figures as a Flower ``MetricRecord``'s content: its evaluation metrics, the
    mean training loss, how many clients delivered and failed, and the bytes exchanged."""
    out: dict[str, int | float | list[int] | list[float]] = dict(record.metrics)
    if record.train_loss is not None:
        out["train_loss"] = record.train_loss
    out["clients"] = len(record.clients)
    out["failed"] = len(record.failed)
    out["bytes_up"] = sum(t.up_bytes for t in record.traffic)
    out["bytes_down"] = sum(t.down_bytes for t in record.traffic)
    return out


def result_of(
    task: Task,
    content: RecordDict | Failure,
    shapes: Mapping[str, tuple[int, int]],
    trained_on: set[str] | None = None,
    peaks: dict[str, float] | None = None,
) -> LocalResult | Failure:
    """A task's reply as its result, or a :class:`Failure` saying why not (``content`` is one
    already, or the reply is malformed). An accepted reply's device goes to ``trained_on``, its
    peak memory to ``peaks`` (each client's largest)."""
    if isinstance(content, Failure):
        return content
    cid = task.client.cid
    try:
        result = content_result(content, cid, Expected(shapes, task.plan.rank))
        device = content_device(content, cid)
        peak = content_peak_memory(content, cid)
    except UpdateError as exc:
        return Failure(f"rejected reply: {exc}")
    if device is not None and trained_on is not None:
        trained_on.add(device)
    if peak is not None and peaks is not None:
        peaks[cid] = max(peak, peaks.get(cid, 0.0))
    return result


@functools.lru_cache(maxsize=2)
def server_data(config_json: str) -> FederationData:
    """The data of the run config ``config_json`` (held-out set, partitions), once per
    process."""
    return federation_data(config_from_json(config_json, "the run's config"))


def wait_for_nodes(grid: Grid, count: int, wait_s: float) -> list[int]:
    """The ids of ``grid``'s nodes once there are ``count`` of them, within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FedloraError(
                f"only {len(nodes)} of clients.num_clients = {count} nodes connected within "
                f"{wait_s:.0f} s; start more SuperNodes or lower clients.num_clients"
            )
        time.sleep(1.0)


def identify(
    grid: Grid,
    nodes: Sequence[int],
    cfg: RunConfig,
    timeout_s: float,
    query: RecordDict | None = None,
) -> tuple[list[ClientInfo], dict[str, int], dict[str, int], dict[str, str]]:
    """Ask every node which client it is (a ``query`` message with ``query`` as content): the
    registered clients in index order, the node of each, its number of examples (where it said)
    and, for a node that called itself by another name than its slot's, what it claimed. A node
    that names no α gets its rank's by ``clients.alpha``."""
    messages = [Message(query or RecordDict(), node, "query") for node in nodes]
    names = [f"node {n}" for n in nodes]
    replies = send(grid, messages, timeout_s, names)
    by_index: dict[int, tuple[ClientInfo, int]] = {}
    examples = {}
    claims = {}
    for node, reply in zip(nodes, replies, strict=True):
        if isinstance(reply, Failure):
            raise FedloraError(f"node {node} did not say which client it is: {reply.reason}")
        rec = config_part(reply, "client", f"node {node}")
        index = _int(rec.get("index"), "index", node)
        if not 0 <= index < cfg.clients.num_clients:
            raise ConfigError(
                f"node {node} says partition-id {index}; expected 0 … {cfg.clients.num_clients - 1}"
            )
        rank = _int(rec.get("rank"), "rank", node, 1)
        alpha = positive_alpha(rec.get("alpha", cfg.clients.alpha_for(rank)), f"node {node}")
        # the slot's id is the server's (from the partition), never the name a node reports
        info = ClientInfo(client_id(index), index, rank, alpha)
        if info.index in by_index:
            raise ConfigError(
                f"nodes {by_index[info.index][1]} and {node} both say partition-id "
                f"{info.index}; give each SuperNode its own --node-config partition-id"
            )
        by_index[info.index] = (info, node)
        if rec.get("cid", info.cid) != info.cid:
            claims[info.cid] = (
                f"node {node} called itself {rec.get('cid')!r}; it is {info.cid}, the slot of "
                f"its partition-id {info.index}"
            )
        if "examples" in rec:  # a private node does not say (the server uses its partition's)
            examples[info.cid] = _int(rec.get("examples"), "examples", node, 1)
    missing = sorted(set(range(cfg.clients.num_clients)) - set(by_index))
    if missing:
        raise ConfigError(
            f"no node has partition-id {missing[0]}; the {cfg.clients.num_clients} nodes need "
            f"partition-id 0 … {cfg.clients.num_clients - 1}"
        )
    ordered = [by_index[i] for i in sorted(by_index)][: cfg.clients.num_clients]
    node_of = {info.cid: node for info, node in ordered}
    return [info for info, _ in ordered], node_of, examples, claims


def _int(value: Any, key: str, node: int, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UpdateError(f"node {node}: {key} must be an int >= {low}, got {value!r}")
    return value


def send(
    grid: Grid, messages: Sequence[Message], timeout_s: float, names: Sequence[str]
) -> list[RecordDict | Failure]:
    """Push ``messages`` and pull the replies for up to ``timeout_s``: per message, its reply's
    content, or a :class:`Failure` saying the node failed or did not answer in time."""
    ids = list(grid.push_messages(messages))
    pending = {mid: i for i, mid in enumerate(ids) if mid}
    out: dict[int, RecordDict | Failure] = {
        i: Failure("Flower did not accept the message") for i, mid in enumerate(ids) if not mid
    }
    deadline = time.monotonic() + timeout_s
    while pending:
        for reply in grid.pull_messages(list(pending)):
            i = pending.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                out[i] = Failure(f"its node failed: {reply.error.reason}")
            else:
                out[i] = reply.content
        if pending and time.monotonic() > deadline:
            for i in pending.values():
                out[i] = Failure(f"no reply within {timeout_s:.0f} s")
            break
        if pending:
            time.sleep(0.1)
    return [out[i] for i in range(len(messages))]

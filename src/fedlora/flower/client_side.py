"""fedlora's methods in your own Flower ``ClientApp``: two calls around your own training.

A ServerApp that runs :class:`fedlora.flower.strategy.FedLoRA` sends each node a ``query``
message when the run starts and a ``train`` message in every round it samples the node. A
ClientApp that keeps its own model loading, data and trainer (transformers' ``Trainer``, TRL's
``SFTTrainer``, a plain loop) answers them with this module::

    from fedlora.flower import client_side

    @app.query()
    def query(msg, context):
        return client_side.identity(msg, context, num_examples=len(trainset))

    @app.train()
    def train(msg, context):
        model = get_model(...)  # your base model (a PEFT model is unwrapped: the run sets the LoRA)
        local = client_side.receive(msg, context, model)
        ...  # train local.model, your way (call local.callbacks where the method has any)
        return client_side.reply(msg, local, num_examples=len(trainset), loss=train_loss)

:func:`receive` does what the method asks before training: the base updates merged so far (FLoRA,
FLoRIST) are applied to the model exactly (:class:`fedlora.precision.MergedBase`), a fresh adapter
of the node's rank is attached with fedlora's seeded initialisation, the round's start (FlexLoRA's
truncation, …) and frozen components (HAFL-freeze) are loaded and what must not train is frozen.
:func:`reply` reads the trained factors at the node's rank, applies the node's privacy, detaches
the adapter (the model is the plain base again) and packs the reply the strategy checks. Both run
the same steps as fedlora's own clients (:mod:`fedlora.local`), so a node that trains with
fedlora's loop (:meth:`LocalRound.train`) computes what fedlora's engines compute.

**Who a node is.** Its node config's ``partition-id`` (Flower's simulation engine sets it), its
rank: :func:`node_rank` (the node config's ``rank``, else the run config's
``model.lora.peft-lora-r``: one rank, or a comma-separated list cycled over the partition ids),
and how it holds its base: :func:`quantization`.

**What a node trusts.** The method and its settings come from the server with every message (the
run's fedlora config); the node's privacy follows :func:`fedlora.flower.apps.node_view`: a node
outside Flower's simulation engine keeps its own ``dp-clip-norm`` and ``dp-noise-multiplier``
unless its node config says ``trust-server = true``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora import adapters, devices
from fedlora.clients import Callbacks, Session
from fedlora.config import RunConfig, config_from_json
from fedlora.data import Example
from fedlora.data.encode import LazyEncoded
from fedlora.errors import ConfigError, UpdateError
from fedlora.flower import FEDLORA_RECORD
from fedlora.flower.apps import NodeState, node_quantization, node_view, rebuild_base
from fedlora.flower.records import config_part, content_plan, positive_alpha, result_content
from fedlora.local import Opened, finish_upload, open_adapters
from fedlora.precision import MergedBase
from fedlora.privacy import withholds
from fedlora.rounds import LocalPlan, LocalResult
from fedlora.seeds import derive_seed
from fedlora.train import train_local

log = logging.getLogger("fedlora")

RANK_KEY = "model.lora.peft-lora-r"
"""The FlowerTune run-config key of the LoRA rank (:func:`node_rank`)."""

_bases: weakref.WeakKeyDictionary[Any, MergedBase] = weakref.WeakKeyDictionary()
"""Each model's merged base, while the model lives: a ClientApp that keeps its model between
messages keeps its pristine weights here (a new model starts pristine)."""


def message_config(msg: Message) -> RunConfig:
    """The run's fedlora config, as the server sent it with ``msg``."""
    content = msg.content if msg.has_content() else RecordDict()
    where = f"{msg.metadata.message_type} message"
    record = content.config_records.get(FEDLORA_RECORD)
    text = None if record is None else record.get("config")
    if not isinstance(text, str):
        raise UpdateError(
            f"the {where} has no record {FEDLORA_RECORD!r} with the run's config: is the "
            "ServerApp's strategy fedlora.flower.strategy.FedLoRA?"
        )
    return config_from_json(text, f"{where}'s config")


def node_index(context: Context) -> int:
    """The node's ``partition-id``: which registered client it is."""
    index = context.node_config.get("partition-id")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(
            f"node config partition-id must be an int >= 0, got {index!r}; start the SuperNode "
            'with --node-config "partition-id=K" (the simulation engine sets it)'
        )
    return index


def node_rank(context: Context) -> int:
    """The node's LoRA rank: node config ``rank``, else run config ``model.lora.peft-lora-r``
    (an int for every node, or a comma-separated list of ints, node ``k`` taking entry
    ``k mod len``, as fedlora's ``clients.ranks`` cycles)."""
    if "rank" in context.node_config:
        value, where = context.node_config["rank"], "node config rank"
    elif RANK_KEY in context.run_config:
        value, where = context.run_config[RANK_KEY], f"run config {RANK_KEY}"
    else:
        raise ConfigError(
            f"this node has no rank: give it node config rank=R, or the run config {RANK_KEY}"
        )
    if isinstance(value, str):
        try:
            ranks = [int(part) for part in value.split(",")]
        except ValueError:
            raise ConfigError(
                f"{where} must be an int or comma-separated ints, got {value!r}"
            ) from None
        value = ranks[node_index(context) % len(ranks)]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must hold ranks >= 1, got {value!r}")
    return value


def quantization(context: Context, cfg: RunConfig) -> str:
    """How this node should load its base (``none``, ``8bit`` or ``4bit``, bitsandbytes): its
    node config's ``quantization``, else the run's ``clients.quantization``, as fedlora's own
    nodes decide. :func:`receive` takes a quantized model as it is: the merged base updates stay
    float32 beside the quantized weights (:class:`fedlora.precision.MergedBase`)."""
    return node_quantization(cfg, context.node_config, node_index(context))


def identity(
    msg: Message, context: Context, num_examples: int | None = None, rank: int | None = None
) -> Message:
    """The reply to the strategy's ``query``: this node's client (its ``partition-id``), its
    rank (``rank``, else :func:`node_rank`) and, unless the node's privacy keeps it
    (:func:`fedlora.privacy.withholds`), its ``num_examples``. The server derives α from the rank
    with the run's ``clients.alpha`` rule, as for its own clients."""
    cfg = node_view(message_config(msg), context.node_config)
    record = ConfigRecord({"index": node_index(context), "rank": rank or node_rank(context)})
    if num_examples is not None and not withholds(cfg.privacy):
        record["examples"] = int(num_examples)
    return Message(RecordDict({"client": record}), reply_to=msg)


@dataclass
class LocalRound:
    """One round of this node's training, between :func:`receive` and :func:`reply`."""

    model: Any
    """The model with this round's adapter attached (a PEFT model): train it."""
    callbacks: Callbacks
    """What the method asks of the training loop (:class:`fedlora.clients.Callbacks`): a
    penalty added to every loss (HetLoRA), an action after each step's backward passes (HAFL's
    importance) or after each optimizer step (AdaLoRA's budget). Empty for most methods; a
    loop that does not call them trains another method than the one named."""
    cfg: RunConfig
    """The run's config as this node applies it (its privacy: :func:`node_view`)."""
    plan: LocalPlan
    round: int
    seed: int
    """The seed of the adapter's initialisation, and of fedlora's batches."""
    index: int
    opened: Opened

    def train(self, examples: Sequence[Example], tokenizer: Any) -> float:
        """Train on ``examples`` with fedlora's own loop (``cfg.train``): what fedlora's
        engines run for this client. The mean training loss."""
        data = LazyEncoded(list(examples), tokenizer, self.cfg.model.max_length)
        pad_id = int(tokenizer.pad_token_id)
        train = self.cfg.train
        return train_local(self.model, data, train, pad_id, self.seed, None, self.callbacks).loss


def receive(msg: Message, context: Context, model: Any, steps: int | None = None) -> LocalRound:
    """Set ``model`` (a transformers model; a PEFT model's adapters are removed first) up for
    the round ``msg`` asks for: the merged base updates applied, the method's adapter of this
    node's rank attached and loaded. ``steps``: the optimizer steps the node's trainer will take
    (AdaLoRA's budget schedule needs them; default ``train.steps``)."""
    cfg = node_view(message_config(msg), context.node_config)
    plan, t, base = content_plan(msg.content)
    index = node_index(context)
    record = config_part(msg.content, "plan", "train message")
    sent_to = record.get("index", index)
    if sent_to != index:
        raise UpdateError(
            f"train message: the plan is client {sent_to!r}'s, this node is partition-id {index}"
        )
    alpha = positive_alpha(record.get("alpha"), "train message: plan")
    if hasattr(model, "peft_config"):  # a PEFT model: the run attaches its own adapter
        log.info("fedlora: removing the ClientApp's own PEFT adapters; the run sets the LoRA")
        model = model.unload()
    shapes = adapters.target_shapes(model, cfg.model.targets)
    rebuild_base(context, base, _merged_base(model), shapes)
    session = Session(
        cfg,
        plan,
        t,
        alpha,
        derive_seed(cfg.seed, t, index),
        steps if steps is not None else cfg.train.steps,
        tuple(shapes),
        NodeState(context),
    )
    opened = open_adapters(model, [session])
    devices.reset_peak_memory(devices.device_of(opened.model))
    return LocalRound(opened.model, opened.callbacks[0], cfg, plan, t, session.seed, index, opened)


def reply(
    msg: Message, local: LocalRound, num_examples: int | None, loss: float | None = None
) -> Message:
    """The reply to ``msg`` after training ``local.model``: the trained factors at the node's
    rank (noised where the node's privacy clips), what the method reads besides them, and, unless
    the node's privacy keeps them, ``num_examples``, the training ``loss`` and (on CUDA) the peak
    memory since :func:`receive`. The adapter is
    detached: the model is the plain base again."""
    hook = local.opened.hooks[0]
    try:
        upload = hook.read(local.model)
    finally:
        base = adapters.detach(local.model)
    upload = finish_upload(hook, upload, local.opened.befores[0], local.index)
    private = withholds(local.cfg.privacy)
    result = LocalResult.of(upload, None if private else loss, None if private else num_examples)
    device = devices.device_of(base)
    peak = None if private else devices.peak_memory_mb(device)
    content = result_content(result, device=str(device), peak_memory_mb=peak)
    return Message(content, reply_to=msg)


def _merged_base(model: Any) -> MergedBase:
    """``model``'s merged base, made (pristine) the first time this process sees the model."""
    base = _bases.get(model)
    if base is None:
        base = _bases[model] = MergedBase(model)
    return base

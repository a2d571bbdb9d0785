"""Local training of one client: a plain torch loop over a PEFT model.

AdamW over the trainable parameters only, a fixed number of optimizer steps (or epochs), gradient
accumulation and clipping, batches drawn from a seeded generator. Nothing global is seeded.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fedlora import adapters, devices
from fedlora.clients.base import Callbacks
from fedlora.config import TrainConfig
from fedlora.data.encode import IGNORE_INDEX, Encoded, collate, pack
from fedlora.scoring import (
    labelled_logits,
    mean_token_loss,
    packs_sequences,
    token_cross_entropies,
)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over the round's micro-batches."""
    steps: int
    examples_seen: int
    skipped_steps: int = 0
    """Optimizer steps float16's loss scaling skipped (their gradients overflowed)."""


def batches(
    data: Sequence[Encoded], batch_size: int, generator: torch.Generator
) -> Iterator[list[Encoded]]:
    """Endless shuffled batches: each epoch is a fresh permutation from ``generator``."""
    if not data:
        raise ValueError("cannot train on an empty data set")
    while True:
        order = torch.randperm(len(data), generator=generator, device=generator.device).tolist()
        for i in range(0, len(order), batch_size):
            yield [data[j] for j in order[i : i + batch_size]]


def num_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps for a round: ``steps``, or ``epochs`` over the data rounded up."""
    if cfg.epochs is None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * num_examples / per_step))


def train_local(
    model: Any,
    data: Sequence[Encoded],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    progress: str | None = None,
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters in place on ``data``; return the mean loss.

    ``progress``: a label for a progress bar over the steps (None: no bar). ``callbacks``: a
    client hook's (:class:`fedlora.clients.Callbacks`): ``on_step`` once per optimizer step after
    the backward passes, while the gradients are still there (importance tracking);
    ``penalty`` added to every micro-batch's loss (HetLoRA's tail norm; the reported loss is the
    model's alone); ``after_step`` with the step index after each optimizer step, before the
    gradients are cleared (AdaLoRA's budget).

    A model computing in float16 trains with dynamic loss scaling (``torch.amp.GradScaler``):
    float16's range would underflow small gradients and overflow large ones on their way back
    through the frozen base. The gradients are unscaled before ``on_step`` and clipping, and a
    step whose gradients overflowed is skipped (counted in :attr:`TrainResult.skipped_steps`).
    bfloat16 has float32's range and needs none.
    """
    hooks = callbacks or Callbacks()
    on_step, penalty, after_step = hooks.on_step, hooks.penalty, hooks.after_step
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = loss_scaler(model)
    skipped = 0
    generator = torch.Generator().manual_seed(seed)
    stream = batches(data, cfg.batch_size, generator)
    steps = num_steps(cfg, len(data))
    was_training = model.training
    model.train()
    losses: list[torch.Tensor] = []
    seen = 0
    bar = tqdm(total=steps, desc=progress, leave=False, disable=progress is None)
    for step in range(steps):
        for _ in range(cfg.grad_accum):
            batch = next(stream)
            batch_tensors = collate(batch, pad_id)
            loss = mean_token_loss(model, batch_tensors)
            total = loss if penalty is None else loss + penalty()
            torch.autograd.backward(scaler.scale(total / cfg.grad_accum))
            losses.append(loss.detach())
            seen += len(batch)
        scaler.unscale_(optimizer)
        if on_step is not None:
            on_step()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += int(scaler.is_enabled() and scaler.get_scale() < scale)
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
    bar.close()
    model.train(was_training)
    mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    del optimizer, stream
    release_memory()
    return TrainResult(loss=mean_loss, steps=steps, examples_seen=seen, skipped_steps=skipped)


@dataclass(frozen=True)
class Member:
    """One client of a fused group (:func:`train_fused`): its adapter's name, its data, its own
    training settings and seed, and its adapter's trainable parameters."""

    adapter: str
    data: Sequence[Encoded]
    cfg: TrainConfig
    seed: int
    params: list[torch.nn.Parameter]


def train_fused(
    model: Any,
    members: Sequence[Member],
    pad_id: int,
    progress: str | None = None,
) -> list[TrainResult]:
    """Train several clients' adapters on one model at once; per member, what
    :func:`train_local` would have returned for it alone.

    Each micro-batch concatenates one batch of every member still training (each from its own
    seeded stream, as :func:`train_local` draws them), runs the shared base once and each
    adapter on its own rows only (:class:`fedlora.adapters.RowAdapters`, PEFT's mixed-adapter
    forward), and back-propagates the sum of the members' mean token losses:
    member ``k``'s parameters touch only its rows, so its gradient is its loss's alone. Each
    member keeps its own AdamW, learning rate, gradient clipping and number of steps (one that
    has finished leaves the batch). Every member must share ``grad_accum`` (one micro-batch of
    each per pass); float16 (loss scaling) and client callbacks are :func:`train_local`'s only.
    For a model that :func:`fedlora.scoring.packs_sequences`, each member's examples are packed
    into rows of its own (:func:`fedlora.data.encode.pack`) and the LM head runs on the labelled
    tokens only; otherwise every example is padded to the group's longest.
    """
    accum = {m.cfg.grad_accum for m in members}
    if len(accum) != 1:
        raise ValueError(f"fused members must share train.grad_accum, got {sorted(accum)}")
    (grad_accum,) = accum
    if computes_in_float16(model):
        raise ValueError("fused training does not take float16 (loss scaling): train each alone")
    packs = packs_sequences(model)  # asked before RowAdapters takes over the adapters' forward
    with adapters.RowAdapters(model) as rows:
        return _train_fused(model, members, pad_id, rows, packs and rows.slices_every_layer,
                            grad_accum, progress)  # fmt: skip


def _train_fused(
    model: Any,
    members: Sequence[Member],
    pad_id: int,
    rows: adapters.RowAdapters,
    packed: bool,
    grad_accum: int,
    progress: str | None,
) -> list[TrainResult]:
    optimizers = [
        torch.optim.AdamW(m.params, lr=m.cfg.lr, weight_decay=m.cfg.weight_decay) for m in members
    ]
    streams = [
        batches(m.data, m.cfg.batch_size, torch.Generator().manual_seed(m.seed)) for m in members
    ]
    steps = [num_steps(m.cfg, len(m.data)) for m in members]
    losses: list[list[torch.Tensor]] = [[] for _ in members]
    seen = [0] * len(members)
    was_training = model.training
    model.train()
    bar = tqdm(total=sum(steps), desc=progress, leave=False, disable=progress is None)
    for step in range(max(steps)):
        active = [k for k, n in enumerate(steps) if step < n]
        for _ in range(grad_accum):
            drawn = [next(streams[k]) for k in active]
            if packed:
                fused, counts = pack(drawn, pad_id)
            else:
                fused = collate([e for b in drawn for e in b], pad_id)
                counts = [len(b) for b in drawn]
            names = [
                members[k].adapter for k, n in zip(active, counts, strict=True) for _ in range(n)
            ]
            rows.assign(names, fused["input_ids"].shape[1])
            logits, targets, mask = labelled_logits(model, fused)
            ends = _member_ends(fused, counts, packed, targets.shape[1])
            per_member = token_cross_entropies(
                logits.flatten(0, 1), targets.flatten(), mask.flatten(), ends
            )
            for k, batch, loss in zip(active, drawn, per_member.detach(), strict=True):
                losses[k].append(loss)
                seen[k] += len(batch)
            total = per_member.sum()
            torch.autograd.backward(total / grad_accum)
        for k in active:
            bound = members[k].cfg.max_grad_norm
            if bound is not None:
                torch.nn.utils.clip_grad_norm_(members[k].params, bound)
            optimizers[k].step()
            optimizers[k].zero_grad(set_to_none=True)
        bar.update(len(active))
    bar.close()
    model.train(was_training)
    del optimizers, streams
    release_memory()
    return [
        TrainResult(
            loss=float(torch.stack(losses[k]).mean()) if losses[k] else float("nan"),
            steps=steps[k],
            examples_seen=seen[k],
        )
        for k in range(len(members))
    ]


FUSE_MEMORY_SHARE = 0.5
"""The share of the memory its model leaves free on a device that one fused pass's activations
may take (:func:`tokens_per_pass`); the rest is for the optimizers, the allocator's slack and
whatever else the device runs."""


def activation_bytes_per_token(
    config: Any, element_bytes: int, seq_len: int, checkpointing: bool
) -> int:
    """An estimate of the memory one token of a training step keeps for the backward pass of a
    decoder-only model with ``config`` (a transformers config) computing in ``element_bytes``-byte
    elements.

    Per layer, the activations Korthikanti et al. count for a layer that recomputes nothing
    ("Reducing Activation Recomputation in Large Transformer Models", 2022, §4.1), for an
    MLP of intermediate size ``i`` (gated, as Llama's: two projections and their product)
    rather than their ``4h`` GeLU MLP: ``17 h + 6 i + 5 a s`` bytes at 2-byte elements (``h``
    hidden size, ``a`` attention heads, ``s`` = ``seq_len``; the ``5 a s`` of the attention
    scores only where they are materialised: eager attention, or attention dropout, which
    takes SDPA off its fused kernels); with ``checkpointing`` a layer keeps only
    its input (``h`` elements) and one layer's activations are alive again during the backward
    pass. The language-model head adds the logits, in the compute dtype and upcast to float32
    for the loss, and their float32 gradient: ``vocab × (element_bytes + 8)``. LoRA's own
    tensors are not counted. An estimate, not a bound: ``tests/test_fused.py`` keeps it within
    a factor of two of the bytes autograd really saves, on a Llama-like and a GPT-2-like model
    (GPT-2 saves more than counted here: its dropout masks, eager attention's float32 mask); the
    share of memory a pass may take (:data:`FUSE_MEMORY_SHARE`) leaves room for that."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(text.hidden_size)
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    dropout = getattr(text, "attention_dropout", None) or getattr(text, "attn_pdrop", None) or 0
    scores = getattr(text, "_attn_implementation", None) == "eager" or float(dropout) > 0
    layer = (17 * h + 6 * int(inner) + (5 * heads * seq_len if scores else 0)) * element_bytes // 2
    kept = layers * (h * element_bytes if checkpointing else layer)
    if checkpointing:
        kept += layer
    return kept + int(text.vocab_size) * (element_bytes + 8)


def tokens_per_pass(model: Any, cfg: TrainConfig, seq_len: int, checkpointing: bool) -> int:
    """The most tokens one fused pass of ``model`` may carry: ``cfg.fuse_tokens``, and no more
    than the activations (:func:`activation_bytes_per_token`) that
    :data:`FUSE_MEMORY_SHARE` of the memory the model leaves on its device holds
    (:func:`fedlora.devices.total_memory_bytes` less the model's parameters and buffers). A
    function of the model and the machine only, so a run and its resumption on the same machine
    group their clients alike."""
    tensors = [*model.parameters(), *model.buffers()]
    resident = sum(t.numel() * t.element_size() for t in tensors)
    frozen = next((p for p in model.parameters() if not p.requires_grad), tensors[0])
    free = devices.total_memory_bytes(frozen.device) - resident
    per_token = activation_bytes_per_token(
        model.config, frozen.element_size(), seq_len, checkpointing
    )
    return max(0, min(cfg.fuse_tokens, int(FUSE_MEMORY_SHARE * free) // per_token))


def _member_ends(
    batch: dict[str, torch.Tensor], rows: Sequence[int], packed: bool, kept: int
) -> list[int]:
    """Where each member's flattened targets end (:func:`fedlora.scoring.token_cross_entropies`),
    its ``rows`` rows in turn: ``kept`` a row in a padded batch; in a packed one, the labels its
    rows hold (gathered row after row)."""
    if packed:
        per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    else:
        per_row = [kept] * len(batch["labels"])
    ends: list[int] = []
    row = 0
    for n in rows:
        ends.append((ends[-1] if ends else 0) + sum(per_row[row : row + n]))
        row += n
    return ends


def computes_in_float16(model: Any) -> bool:
    """Whether ``model``'s frozen weights are float16 (it then trains with loss scaling)."""
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    return frozen is not None and frozen.dtype == torch.float16


def loss_scaler(model: Any) -> torch.amp.GradScaler:
    """Dynamic loss scaling for a model whose frozen weights are float16; a pass-through
    (disabled) scaler for every other dtype."""
    device = next(model.parameters()).device
    return torch.amp.GradScaler(device.type, enabled=computes_in_float16(model))


def release_memory() -> None:
    """Give freed memory back between clients.

    On CUDA: collect reference cycles that may hold device tensors, then return the caching
    allocator's free blocks. On CPU the optimizer state and activations are freed by reference
    counting as soon as they go out of scope, and a full ``gc.collect()`` (about 0.2 s with a
    transformers model loaded) would only add latency per client.
    """
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()

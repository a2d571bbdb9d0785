"""Log-likelihood scores of responses and of choices, from one or two forward passes.

For a batch of sequences whose labels mark the response tokens, :func:`response_log_likelihood`
gives ``Σ_{t ∈ R} log p(x_t | x_<t)`` per sequence. For ``B`` prompts with ``C`` choices each,
:func:`choice_log_likelihood` gives ``s_bc = Σ_t log p(c_bc,t | prompt_b, c_bc,<t)``.

Choices share their prompt: the ``B`` prompts run once, keeping their KV cache and only their
last position's logits, then the ``B · C`` choice continuations (a few tokens each) run in a
second pass on that cache, instead of ``B · C`` full prompt-plus-choice sequences. On
SmolLM2-135M (CPU, 24 examples, evaluation defaults) that is 4× faster on MMLU and 5× on BBC
News than full sequences, with the same numbers. A model whose forward returns no cache that
can be repeated along the batch gets the full sequences.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fedlora.data.encode import IGNORE_INDEX, Encoded, collate
from fedlora.devices import HOST, is_cuda, to_host

Choices = list[list[int]]
"""The token ids of each choice of one example, written as the response (end-of-turn included)."""


def labelled_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at the positions whose next token carries a label, and those labels.

    ``batch``: :func:`fedlora.data.encode.collate`'s tensors, ``(B, T)``. Position ``t`` predicts
    token ``t + 1``; the ``K`` positions kept are those whose next token is labelled in any row
    (``logits_to_keep``), so the LM head (a fifth of a small model's FLOPs) never runs on a
    prompt. Returns ``logits (B, K, V)`` in the model's dtype, ``targets (B, K)`` and their
    ``mask (B, K)``, on the model's device. A model that ignores ``logits_to_keep`` gives every
    position; the kept ones are picked from them.

    A packed batch (:func:`fedlora.data.encode.pack`: ``position_ids``, no ``attention_mask``;
    only for a model that :func:`packs_sequences`) runs the LM head on the labelled positions
    only, gathered row after row: ``logits (1, N, V)``, ``targets (1, N)`` and an all-true
    ``mask`` for its ``N`` labels.
    """
    device = next(model.parameters()).device
    targets = batch["labels"][:, 1:]  # (B, T-1)
    if "position_ids" in batch:
        return _packed_logits(model, batch, targets, device)
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero()[:, 0]  # (K,)
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        logits_to_keep=keep.to(device),
        use_cache=False,
    ).logits
    if logits.shape[1] != keep.numel():
        logits = logits[:, keep.to(device)]
    targets = targets[:, keep].to(device)
    return logits, targets, targets != IGNORE_INDEX


def _packed_logits(
    model: Any, batch: dict[str, torch.Tensor], targets: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`labelled_logits` of a packed batch: the hidden states the LM head receives are
    gathered at the labelled positions first (a pre-forward hook on the output embeddings: what
    the model does to the head's output, a scale or a soft cap, is element-wise and still
    applies)."""
    labelled = (targets != IGNORE_INDEX).to(device)  # (B, T-1)

    def gather(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # (B, T, H): every position (logits_to_keep=0)
        return (hidden[:, :-1][labelled][None], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        logits = model(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            logits_to_keep=0,
            use_cache=False,
        ).logits
    finally:
        handle.remove()
    picked = targets.to(device)[labelled][None]  # (1, N)
    return logits, picked, torch.ones_like(picked, dtype=torch.bool)


def packs_sequences(model: Any) -> bool:
    """Whether ``model`` keeps packed sequences apart (:func:`fedlora.data.encode.pack`).

    Two short random sequences run alone, packed in one row (positions restarting), and joined
    (positions running on, so the second sees the first). transformers' attention masks keep
    packed sequences apart for the models built on its mask utilities (Llama, Qwen2, Mistral,
    Gemma, GPT-2, …): the packed second sequence then differs from its run alone by rounding
    only, a tenth of what joining it to the first changes, or less. A model that does not would
    let a sequence attend to the one before it. Asked once per model (kept on its base model),
    in eval mode without gradients and without its adapters (call it before
    :class:`fedlora.adapters.RowAdapters` takes over their forward); the model's mode is
    restored."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    known = getattr(base, "_fedlora_packs", None)
    if known is not None:
        return bool(known)
    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    gen = torch.Generator(device=HOST).manual_seed(0)
    first, second = (torch.randint(vocab, (1, n), generator=gen, device=HOST) for n in (5, 7))
    ids = torch.cat([first, second], dim=1).to(device)
    was_training = model.training
    model.eval()
    # the base alone (a PEFT model's adapters off): whether attention keeps sequences apart
    peft = hasattr(model, "disable_adapter")
    bare = model.disable_adapter() if peft else contextlib.nullcontext()
    try:
        with torch.no_grad(), bare:
            alone = model(input_ids=second.to(device), use_cache=False).logits
            runs = []
            for positions in (torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)):
                out = model(input_ids=ids, position_ids=positions[None].to(device), use_cache=False)
                runs.append(float((out.logits[:, 5:] - alone).abs().max()))
    except (TypeError, ValueError):  # a forward that takes no position_ids
        packs = False
    else:
        packed, joined = runs
        packs = packed <= 0.1 * joined
    finally:
        model.train(was_training)
    base._fedlora_packs = packs
    return packs


def mean_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``−(1/N) Σ log p(label)`` over the ``N`` labelled tokens of ``batch`` (float32), what
    ``model(**batch).loss`` gives for a causal LM, from :func:`labelled_logits` only."""
    logits, targets, mask = labelled_logits(model, batch)
    return token_cross_entropy(logits.flatten(0, 1), targets.flatten(), mask.flatten())


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``−(1/N) Σ_{i: mask_i} log softmax(logits_i)[targets_i]``, float32, ``N = Σ mask``.

    ``logits: (M, V)`` in any dtype, ``targets``, ``mask: (M,)``. The same value and gradient as
    ``F.cross_entropy(logits[mask].float(), targets[mask])``, computed in row blocks of float32
    (:class:`_TokenCrossEntropy`), so neither the ``(N, V)`` float32 copy of the logits, its
    log-softmax, nor the zero-filled gradients of the cast and the boolean index are ever made:
    on SmolLM2-135M those four ``(N, 49152)`` passes were a sixth of a bfloat16 training step on
    CPU.
    """
    return token_cross_entropies(logits, targets, mask, (logits.shape[0],))[0]


def token_cross_entropies(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, ends: Sequence[int]
) -> torch.Tensor:
    """:func:`token_cross_entropy` of each segment of rows, ``(G,)`` float32: segment ``g`` is
    rows ``ends[g-1] … ends[g]-1`` (from 0; the last end is ``M``). Each value and each row's
    gradient are bitwise what :func:`token_cross_entropy` gives that segment alone, and the
    logits get one gradient tensor: slicing the logits per segment instead would make each
    segment's backward a zero-filled ``(M, V)`` tensor, added up (fused training's clients,
    :func:`fedlora.train.train_fused`)."""
    if not ends or ends[-1] != logits.shape[0] or list(ends) != sorted(ends):
        raise ValueError(f"segment ends {list(ends)} must rise to the {logits.shape[0]} rows")
    losses: torch.Tensor = _TokenCrossEntropy.apply(logits, targets, mask, tuple(ends))  # type: ignore[no-untyped-call]
    return losses


_BLOCK_ELEMENTS = 1 << 20
"""Float32 elements per block of rows on a CPU (4 MB): a block's exp and its cast stay in
cache."""
_CUDA_BLOCK_ELEMENTS = 1 << 26
"""Float32 elements per block on CUDA (256 MB): a GPU gains nothing from cache-sized blocks, and
each block costs a few kernel launches (with a 128k vocabulary, 8 rows a block would be
thousands of launches a step; 512 rows a block is a handful)."""


def block_rows(vocab: int, device: torch.device) -> int:
    """Rows of ``vocab`` logits per float32 block on ``device``."""
    elements = _CUDA_BLOCK_ELEMENTS if is_cuda(device) else _BLOCK_ELEMENTS
    return max(1, elements // max(1, vocab))


def _lse_and_picked(logits: torch.Tensor, safe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits (M, V)``: ``logsumexp`` and the logit at ``safe (M, 1)``, float32,
    computed block by block in one float32 buffer (in-place, so nothing else is allocated)."""
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    picked = logits.gather(1, safe)[:, 0].float()
    for rows, block in _float_blocks(logits):
        top = block.amax(dim=1, keepdim=True)
        lse[rows] = block.sub_(top).exp_().sum(dim=1).log_().add_(top[:, 0])
    return lse, picked


def _float_blocks(logits: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, block)``: consecutive row ranges of ``logits`` and each one's float32 copy, all in
    one reused buffer of about :data:`_BLOCK_ELEMENTS` elements (a block is overwritten by the
    next one)."""
    per_block = block_rows(logits.shape[1], logits.device)
    n = min(per_block, logits.shape[0])
    buffer = torch.empty((n, logits.shape[1]), dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], per_block):
        rows = slice(i, min(i + per_block, logits.shape[0]))
        block = buffer[: rows.stop - rows.start]
        yield rows, block.copy_(logits[rows])


class _TokenCrossEntropy(torch.autograd.Function):
    """Masked mean cross-entropy over each segment of rows of logits, in float32 row blocks.

    Forward: per row ``lse = logsumexp(x)`` (float32), segment ``g``'s loss
    ``= Σ_{mask, rows of g} (lse − x[target]) / N_g``. Backward:
    ``∂/∂x = g_g · mask · (softmax(x) − onehot(target)) / N_g`` on segment ``g``'s rows, written
    in the logits' dtype, which is what autograd gives through ``.float()`` (the cast's backward
    rounds the float32 gradient to the logits' dtype once). Rows are independent, so blocks and
    segments change nothing but the size of the temporaries.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        ends: tuple[int, ...],
    ) -> torch.Tensor:
        safe = targets.clamp(min=0)[:, None]  # ignored rows may hold -100
        lse, picked = _lse_and_picked(logits, safe)
        weight = mask.float()
        spans = [slice(a, b) for a, b in zip((0, *ends[:-1]), ends, strict=True)]
        counts = [weight[s].sum() for s in spans]
        ctx.save_for_backward(logits, safe, weight, lse)
        ctx.spans, ctx.counts = spans, counts
        per_row = (lse - picked).double()
        losses = [
            (per_row[s] @ weight[s].double() / n).float()
            for s, n in zip(spans, counts, strict=True)
        ]
        return torch.stack(losses)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, safe, weight, lse = ctx.saved_tensors
        scale = torch.empty_like(weight)  # (M,)
        for g, (span, count) in enumerate(zip(ctx.spans, ctx.counts, strict=True)):
            scale[span] = weight[span] * (grad[g].float() / count)
        out = torch.empty_like(logits)
        for rows, block in _float_blocks(logits):
            block.sub_(lse[rows, None]).exp_()  # softmax
            block.scatter_add_(1, safe[rows], torch.full_like(block[:, :1], -1.0))
            out[rows] = block.mul_(scale[rows, None])
        return out, None, None, None


def response_log_likelihood(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence ``Σ_{t: labels_t ≠ -100} log p(labels_t | x_<t)`` (float64) and the count.

    ``batch``: :func:`fedlora.data.encode.collate`'s tensors, ``(B, T)``; returns two ``(B,)``
    tensors on the CPU. Logits only at labelled positions (:func:`labelled_logits`); log-softmax
    in float32.
    """
    logits, targets, mask = labelled_logits(model, batch)
    return _sum_log_p(logits, targets, mask), to_host(mask.sum(dim=1))


@functools.cache
def cache_name() -> str:
    """The KV cache's forward keyword and output field: ``cache`` in the transformers that
    renamed it (``past_key_values`` is deprecated there and goes in 5.40), else
    ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def choice_log_likelihood(
    model: Any, prompts: Sequence[list[int]], options: Sequence[Choices], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s_bc = Σ_t log p(o_bc,t | prompt_b, o_bc,<t)`` for ``B`` prompts with ``C`` options each.

    Returns the scores ``(B, C)`` (float64) and the option lengths ``(B, C)``, on the CPU. The
    prompts run once, left-padded (``(B, P)``, positions counted from each first real token),
    keeping their KV cache and the logits of their last position only; the cache is repeated
    ``C`` times and the options (``(B·C, L-1)``, their last token only a target) continue it
    with positions ``len(prompt_b) + t``; pad keys are masked. A model that returns no such
    cache gets the ``B · C`` full sequences instead.
    """
    device = next(model.parameters()).device
    n_options = len(options[0])
    prompt_ids, prompt_mask = pad_ids(prompts, pad_id, device, left=True)  # (B, P)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,  # a model without this option returns all positions: same last one
    )
    cache: Any = getattr(out, cache_name(), None)
    if not hasattr(cache, "batch_repeat_interleave"):
        return _choice_log_likelihood_full(model, prompts, options, pad_id)
    option_ids, option_mask = pad_ids([o for row in options for o in row], pad_id, device)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    first = first.repeat_interleave(n_options, dim=0)  # (B·C, V)
    sums = first.gather(1, option_ids[:, :1]).squeeze(1).double()  # (B·C,)
    if option_ids.shape[1] > 1:
        cache.batch_repeat_interleave(n_options)
        steps = torch.arange(option_ids.shape[1] - 1, device=device)
        lengths = prompt_mask.sum(dim=1).repeat_interleave(n_options)  # (B·C,)
        logits = model(
            input_ids=option_ids[:, :-1],
            attention_mask=torch.cat(
                [prompt_mask.repeat_interleave(n_options, dim=0), option_mask[:, :-1]], dim=1
            ),
            position_ids=lengths[:, None] + steps,
            use_cache=True,
            **{cache_name(): cache},
        ).logits  # (B·C, L-1, V)
        sums += _sum_log_p(logits, option_ids[:, 1:], option_mask[:, 1:].bool()).to(device)
    shape = (len(prompts), n_options)
    return to_host(sums.view(shape)), to_host(option_mask.sum(dim=1).view(shape))


def _choice_log_likelihood_full(
    model: Any, prompts: Sequence[list[int]], options: Sequence[Choices], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [
        Encoded(p + o, [IGNORE_INDEX] * len(p) + o)
        for p, row in zip(prompts, options, strict=True)
        for o in row
    ]
    sums, counts = response_log_likelihood(model, collate(encoded, pad_id))
    shape = (len(prompts), len(options[0]))
    return sums.view(shape), counts.view(shape)


def _sum_log_p(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t mask_bt · log softmax(logits_bt)[targets_bt]`` per row ``b`` (float64, CPU).

    ``logits: (B, T, V)``; ``targets``, ``mask: (B, T)``. Log-softmax runs in float32 on the
    masked positions only, in row blocks, so no float32 copy of the logits is ever made.
    """
    rows = logits[mask]  # (N, V), in the logits' dtype
    lse, picked = _lse_and_picked(rows, targets[mask][:, None])
    log_p = picked - lse  # (N,)
    sums = torch.zeros(targets.shape[0], dtype=torch.float64, device=targets.device)
    sums.index_add_(0, mask.nonzero()[:, 0], log_p.double())
    return to_host(sums)


def pad_ids(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both ``(B, T)`` long on ``device``, padded on the right (or left)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[b, span] = torch.tensor(list(r), dtype=torch.long, device=device)
        mask[b, span] = 1
    return ids, mask

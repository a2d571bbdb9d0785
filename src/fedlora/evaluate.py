"""Evaluate a causal LM on examples: loss, perplexity, choice accuracy and ROUGE-L.

With ``R_i`` the response tokens of example ``i`` (as :func:`fedlora.data.encode.encode` makes
them, the end-of-turn token included) and ``N = Σ_i |R_i|``:

- ``loss = −(1/N) Σ_i Σ_{t ∈ R_i} log p(x_t | x_<t)``: token-weighted, not a mean of batch
  means; ``perplexity = exp(loss)``.
- ``accuracy`` (classification, multiple choice): choice ``j`` of example ``i`` scores
  ``s_ij = Σ_{t ∈ c_j} log p(c_jt | prompt_i, c_j,<t)``, the summed log-likelihood of the choice
  written as the assistant response, and the prediction is ``argmax_j s_ij`` (ties: the first),
  the way lm-evaluation-harness scores multiple choice. Unlike lm-eval, the end-of-turn token
  is part of the choice: the score is that of answering exactly ``c_j`` and stopping, which is
  what training teaches (``"A"`` does not win by being a prefix of ``"A longer answer"``).
- ``rougeL`` (instruction, ``rouge_samples > 0``): greedy generation for the first
  ``rouge_samples`` examples, ROUGE-L F-measure against the response (``rouge-score``), mean.

Every sequence (an example, or an ``(example, choice)`` pair) is scored in one batched forward
pass, longest first to keep padding low; when a choice equals the response, its pass also gives
the loss, so multiple choice costs one pass per choice and nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from fedlora.data.encode import (
    IGNORE_INDEX,
    Encoded,
    collate,
    encode_prompt,
    tokenize_pair,
    truncate,
)
from fedlora.data.examples import TASK_KINDS, Example, TaskKind
from fedlora.errors import ConfigError


@dataclass(frozen=True)
class _Sequence:
    """One sequence to score: example ``example`` answered by choice ``choice`` (-1: response)."""

    encoded: Encoded
    example: int
    choice: int
    counts_for_loss: bool


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    kind: TaskKind,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    rouge_samples: int = 0,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """``loss`` and ``perplexity``; ``accuracy`` for choices; ``rougeL`` if ``rouge_samples``.

    ``batch_size`` sequences go through each forward pass (an ``(example, choice)`` pair is one
    sequence); each is cut to ``max_length`` tokens as in training. The model runs in eval mode
    under ``torch.no_grad()`` on the device of its parameters; its training mode is restored.
    """
    if kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; allowed: {', '.join(TASK_KINDS)}")
    if not examples:
        raise ConfigError("no examples to evaluate")
    if batch_size < 1 or max_length < 1 or max_new_tokens < 1 or rouge_samples < 0:
        raise ConfigError(
            f"batch_size, max_length and max_new_tokens must be ≥ 1 and rouge_samples ≥ 0, got "
            f"{batch_size}, {max_length}, {max_new_tokens}, {rouge_samples}"
        )
    from tqdm.auto import tqdm

    sequences = _sequences(examples, tokenizer, kind, max_length)
    rouge_examples = list(examples[:rouge_samples]) if kind == "instruction" else []
    batches = -(-len(sequences) // batch_size) + -(-len(rouge_examples) // batch_size)
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=batches, desc="evaluate", disable=not progress) as bar:
            sums, counts = _score(model, sequences, pad_id, batch_size, bar)
            metrics = _loss_metrics(sequences, sums, counts)
            if kind != "instruction":
                metrics["accuracy"] = _accuracy(examples, sequences, sums)
            if rouge_examples:
                metrics["rougeL"] = _rouge_l(
                    model, tokenizer, rouge_examples, batch_size, max_length, max_new_tokens, bar
                )
    finally:
        model.train(was_training)
    return metrics


def _sequences(
    examples: Sequence[Example], tokenizer: Any, kind: TaskKind, max_length: int
) -> list[_Sequence]:
    out = []
    for i, e in enumerate(examples):
        if kind == "instruction":
            out.append(
                _Sequence(truncate(*tokenize_pair(e, tokenizer), max_length, i), i, -1, True)
            )
            continue
        if len(e.choices) < 2 or not 0 <= e.answer < len(e.choices):
            raise ConfigError(
                f"example {i}: kind {kind!r} needs at least 2 choices and the index of the "
                f"correct one, got choices {e.choices} and answer {e.answer}"
            )
        loss_choice = e.choices.index(e.response) if e.response in e.choices else -1
        for j, choice in enumerate(e.choices):
            pair = tokenize_pair(replace(e, response=choice), tokenizer)
            out.append(_Sequence(truncate(*pair, max_length, i), i, j, j == loss_choice))
        if loss_choice < 0:
            out.append(
                _Sequence(truncate(*tokenize_pair(e, tokenizer), max_length, i), i, -1, True)
            )
    return out


def _score(
    model: Any, sequences: Sequence[_Sequence], pad_id: int, batch_size: int, bar: Any
) -> tuple[list[float], list[int]]:
    """Summed log-likelihood of the response tokens of each sequence, and their number."""
    order = sorted(range(len(sequences)), key=lambda s: -len(sequences[s].encoded.input_ids))
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch_sums, batch_counts = response_log_likelihood(
            model, collate([sequences[s].encoded for s in chunk], pad_id)
        )
        for s, total, n in zip(chunk, batch_sums.tolist(), batch_counts.tolist(), strict=True):
            sums[s], counts[s] = total, n
        bar.update(1)
    return sums, counts


def response_log_likelihood(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence ``Σ_{t: labels_t ≠ -100} log p(labels_t | x_<t)`` (float64) and the count.

    ``batch``: :func:`fedlora.data.encode.collate`'s tensors, ``(B, T)``; returns two ``(B,)``
    tensors on the CPU. Log-softmax runs in float32 on the labelled positions only.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)  # (B, T)
    attention_mask = batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = batch["labels"][:, 1:].to(device)  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()  # (N, V)
    log_p = -F.cross_entropy(picked, targets[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=device)
    sums.index_add_(0, rows, log_p.double())
    return sums.cpu(), mask.sum(dim=1).cpu()


def _loss_metrics(
    sequences: Sequence[_Sequence], sums: Sequence[float], counts: Sequence[int]
) -> dict[str, float]:
    picked = [s for s, seq in enumerate(sequences) if seq.counts_for_loss]
    tokens = sum(counts[s] for s in picked)
    loss = -sum(sums[s] for s in picked) / tokens
    return {"loss": float(loss), "perplexity": math.exp(loss) if loss < 700 else math.inf}


def _accuracy(
    examples: Sequence[Example], sequences: Sequence[_Sequence], sums: Sequence[float]
) -> float:
    scores: list[list[float]] = [[] for _ in examples]
    for seq, total in zip(sequences, sums, strict=True):
        if seq.choice >= 0:
            scores[seq.example].append(total)  # in choice order: _sequences emits them so
    correct = sum(
        max(range(len(s)), key=s.__getitem__) == e.answer
        for s, e in zip(scores, examples, strict=True)
    )
    return correct / len(examples)


def _rouge_l(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    bar: Any,
) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [encode_prompt(e, tokenizer)[-max_length:] for e in chunk]
        texts = generate_greedy(model, tokenizer, prompts, max_new_tokens)
        scores += [
            scorer.score(e.response, text)["rougeL"].fmeasure
            for e, text in zip(chunk, texts, strict=True)
        ]
        bar.update(1)
    return float(sum(scores) / len(scores))


def generate_greedy(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (left-padded into one batch), up to EOS."""
    device = next(model.parameters()).device
    pad_id, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[row, width - len(p) :] = 1
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos,
    )
    texts = []
    for ids in out[:, width:].tolist():
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

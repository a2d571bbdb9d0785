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

Cost: one forward pass per batch of examples, longest first to keep padding low; choices share
their prompt's forward pass (:mod:`fedlora.scoring`), and the correct choice's score also gives
the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from fedlora.data.encode import Encoded, collate, encode, encode_prompt, tokenize_pair
from fedlora.data.examples import TASK_KINDS, Example, TaskKind
from fedlora.errors import ConfigError
from fedlora.scoring import Choices, choice_log_likelihood, pad_ids, response_log_likelihood

__all__ = ["choice_log_likelihood", "evaluate", "generate_greedy", "response_log_likelihood"]


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
    label: str = "evaluate",
) -> dict[str, float]:
    """``loss`` and ``perplexity``; ``accuracy`` for choices; ``rougeL`` if ``rouge_samples``.

    ``batch_size`` examples go through each forward pass (with choices: ``batch_size`` prompts,
    then their ``batch_size · C`` continuations). Sequences are cut to ``max_length`` tokens as in
    training (:func:`fedlora.data.encode.encode`); for choices, the shared prompt is cut from the
    left to fit the longest choice, and keeps at least one token. ``progress``: a progress bar
    (``label``) over the forward passes and the generation batches. The model runs in eval mode
    under ``torch.no_grad()`` on the device of its parameters; its training mode is restored.
    """
    if kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; allowed: {', '.join(TASK_KINDS)}")
    if not examples:
        raise ConfigError("no examples to evaluate")
    if batch_size < 1 or max_length < 2 or max_new_tokens < 1 or rouge_samples < 0:
        raise ConfigError(
            "batch_size and max_new_tokens must be ≥ 1, max_length ≥ 2 and rouge_samples ≥ 0, "
            f"got {batch_size}, {max_new_tokens}, {max_length}, {rouge_samples}"
        )
    from tqdm.auto import tqdm

    rouge_examples = list(examples[:rouge_samples]) if kind == "instruction" else []
    plan = _Plan(examples, tokenizer, kind, max_length, batch_size)
    batches = plan.batches + -(-len(rouge_examples) // batch_size)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=batches, desc=label, disable=not progress, leave=False)
        with torch.no_grad(), bar:
            metrics = plan.run(model, _pad_id(tokenizer), bar)
            if rouge_examples:
                metrics["rougeL"] = _rouge_l(
                    model, tokenizer, rouge_examples, batch_size, max_length, max_new_tokens, bar
                )
    finally:
        model.train(was_training)
    return metrics


def choice_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    kind: TaskKind,
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> tuple[dict[str, float], list[list[float]]]:
    """:func:`evaluate`'s metrics on choice examples and every option's score ``s_ij`` (module
    docstring), per example in input order: what ``accuracy`` takes the argmax of."""
    if kind == "instruction":
        raise ConfigError("choice scores need classification or multiple-choice examples")
    plan = _Plan(examples, tokenizer, kind, max_length, batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = plan.run(model, _pad_id(tokenizer), _NoBar())
    finally:
        model.train(was_training)
    return metrics, plan.scores


class _NoBar:
    def update(self, n: int) -> None:
        pass


class _Plan:
    """What to score: response sequences (the loss) and, for choices, prompts with options."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        kind: TaskKind,
        max_length: int,
        batch_size: int,
    ) -> None:
        self.examples, self.batch_size = examples, batch_size
        self.scores: list[list[float]] = []
        self.prompts: list[list[int]] = []
        self.options: list[Choices] = []
        self.loss_choice: list[int] = []  # the choice equal to the response, or -1
        if kind != "instruction":
            for i, e in enumerate(examples):
                prompt, options = _tokenize_choices(e, tokenizer, max_length, i, kind)
                self.prompts.append(prompt)
                self.options.append(options)
                self.loss_choice.append(
                    e.choices.index(e.response) if e.response in e.choices else -1
                )
        else:
            self.loss_choice = [-1] * len(examples)
        missing = [e for e, j in zip(examples, self.loss_choice, strict=True) if j < 0]
        self.sequences = encode(missing, tokenizer, max_length)
        groups: dict[int, list[int]] = {}  # one option count per batch, longest prompts first
        for i in sorted(range(len(self.prompts)), key=lambda i: -len(self.prompts[i])):
            groups.setdefault(len(self.options[i]), []).append(i)
        self.choice_batches = [c for g in groups.values() for c in _chunks(g, batch_size)]
        self.batches = len(self.choice_batches) + -(-len(self.sequences) // batch_size)

    def run(self, model: Any, pad_id: int, bar: Any) -> dict[str, float]:
        sums, counts = _score_sequences(model, self.sequences, pad_id, self.batch_size, bar)
        scores: list[list[float]] = [[] for _ in self.options]
        for chunk in self.choice_batches:
            totals, tokens = choice_log_likelihood(
                model, [self.prompts[i] for i in chunk], [self.options[i] for i in chunk], pad_id
            )
            for i, row, n in zip(chunk, totals.tolist(), tokens.tolist(), strict=True):
                scores[i] = row
                if self.loss_choice[i] >= 0:
                    sums.append(row[self.loss_choice[i]])
                    counts.append(n[self.loss_choice[i]])
            bar.update(1)
        self.scores = scores
        loss = -sum(sums) / sum(counts)
        metrics = {"loss": float(loss), "perplexity": math.exp(loss) if loss < 700 else math.inf}
        if self.options:
            correct = sum(
                max(range(len(s)), key=s.__getitem__) == e.answer
                for s, e in zip(scores, self.examples, strict=True)
            )
            metrics["accuracy"] = correct / len(self.examples)
        return metrics


def _tokenize_choices(
    example: Example, tokenizer: Any, max_length: int, index: int, kind: TaskKind
) -> tuple[list[int], Choices]:
    """The prompt's ids and each choice's, cut so that prompt + longest choice ≤ max_length."""
    e = example
    if len(e.choices) < 2 or not 0 <= e.answer < len(e.choices):
        raise ConfigError(
            f"example {index}: kind {kind!r} needs at least 2 choices and the index of the "
            f"correct one, got choices {e.choices} and answer {e.answer}"
        )
    pairs = [tokenize_pair(replace(e, response=c), tokenizer) for c in e.choices]
    prompt = pairs[0][0]  # the prompt's ids do not depend on the response
    options = [ids[: max_length - 1] for _, ids in pairs]
    if not prompt or not all(options):
        raise ConfigError(f"example {index}: the prompt or a choice has no tokens")
    keep = max_length - max(map(len, options))  # ≥ 1
    return prompt[max(0, len(prompt) - keep) :], options


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _score_sequences(
    model: Any, sequences: Sequence[Encoded], pad_id: int, batch_size: int, bar: Any
) -> tuple[list[float], list[int]]:
    """Summed log-likelihood of the response tokens of each sequence, and their number."""
    order = sorted(range(len(sequences)), key=lambda s: -len(sequences[s].input_ids))
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    for chunk in _chunks(order, batch_size):
        batch_sums, batch_counts = response_log_likelihood(
            model, collate([sequences[s] for s in chunk], pad_id)
        )
        for s, total, n in zip(chunk, batch_sums.tolist(), batch_counts.tolist(), strict=True):
            sums[s], counts[s] = total, n
        bar.update(1)
    return sums, counts


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
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    **sampling: Any,
) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (left-padded into one batch), up to EOS;
    ``sampling``: ``generate``'s sampling options instead (``do_sample=True, temperature=…``)."""
    device = next(model.parameters()).device
    pad_id, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    input_ids, attention_mask = pad_ids(prompts, pad_id, device, left=True)  # (B, T)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos,
        **({"do_sample": False} | sampling),
    )
    texts = []
    for ids in out[:, input_ids.shape[1] :].tolist():
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

"""Token ids for instruction tuning: the loss falls on the response tokens only.

An example becomes ``input_ids = p + r`` and ``labels = [-100] * len(p) + r``, with ``p`` the
prompt's tokens and ``r`` the response's. With a chat template, ``p`` is the template applied to
the user turn with the generation prompt (``…<|im_start|>assistant\\n`` in ChatML) and ``r`` the
rest of the template applied to the user and assistant turns: the response and the end-of-turn
token (anything after the last EOS, like ChatML's closing newline, is dropped: generation stops
at EOS, so those tokens are never produced). Without a template: ``p = "{prompt}\\n"`` (with the
tokenizer's own special tokens, e.g. BOS) and ``r = response + EOS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.data.examples import Example
from fedlora.devices import HOST
from fedlora.errors import ConfigError

IGNORE_INDEX = -100
"""Label of a position without loss (``torch.nn.functional.cross_entropy``'s ``ignore_index``)."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``labels[t]`` is ``input_ids[t]`` on response tokens, else -100."""

    input_ids: list[int]
    labels: list[int]  # -100 where no loss (the prompt, padding); the response tokens otherwise

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) "
                "must have the same length"
            )


def encode(examples: Sequence[Example], tokenizer: Any, max_length: int) -> list[Encoded]:
    """Tokenize ``examples`` with the loss on the response tokens, at most ``max_length`` each.

    Truncation keeps the end of the prompt and the start of the response: the prompt loses
    tokens from its left first, then the response from its right. An example whose response
    has no token is an error naming its index.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1 token, got {max_length}")
    return [
        truncate(*tokenize_pair(e, tokenizer), max_length, index=i) for i, e in enumerate(examples)
    ]


class LazyEncoded(Sequence[Encoded]):
    """:func:`encode` of ``examples``, each tokenized on first use and kept: a round of a few
    steps on a large local data set tokenizes only the examples its batches take (item ``i`` is
    what ``encode(examples, …)[i]`` is)."""

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> None:
        if max_length < 1:
            raise ConfigError(f"max_length must be at least 1 token, got {max_length}")
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length
        self._done: dict[int, Encoded] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Encoded:  # type: ignore[override]
        if i not in self._done:
            pair = tokenize_pair(self.examples[i], self.tokenizer)
            self._done[i] = truncate(*pair, self.max_length, index=i)
        return self._done[i]


def encode_prompt(example: Example, tokenizer: Any) -> list[int]:
    """The prompt's tokens with the generation prompt: what a model continues to answer."""
    return _prompt_ids(example.prompt, tokenizer)[0]


def tokenize_pair(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(p, r)``: the prompt's and the response's token ids, untruncated (module docstring)."""
    prompt_ids, prompt_text = _prompt_ids(example.prompt, tokenizer)
    eos = tokenizer.eos_token_id
    if not _has_template(tokenizer):
        response_ids = _tokens(tokenizer, example.response) + ([] if eos is None else [eos])
        return prompt_ids, response_ids
    full_text = tokenizer.apply_chat_template(
        _messages(example.prompt, example.response), tokenize=False
    )
    full_ids = _tokens(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids) :]
    elif full_text.startswith(prompt_text):  # a merge across the boundary: tokenize apart
        response_ids = _tokens(tokenizer, full_text[len(prompt_text) :])
    else:  # the template renders the prompt differently once answered
        response_ids = _tokens(tokenizer, example.response) + ([] if eos is None else [eos])
    if eos is not None and eos in response_ids:
        last = len(response_ids) - 1 - response_ids[::-1].index(eos)
        response_ids = response_ids[: last + 1]
    return prompt_ids, response_ids


def truncate(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int, index: int = 0
) -> Encoded:
    """``p + r`` cut to ``max_length``: ``p`` from the left first, then ``r`` from the right."""
    if not response_ids:
        raise ConfigError(f"example {index}: the response has no tokens; nothing to learn")
    response = list(response_ids[:max_length])
    keep = max_length - len(response)
    prompt = list(prompt_ids[max(0, len(prompt_ids) - keep) :]) if keep > 0 else []
    return Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)`` long.

    ``T`` is the longest example; padding has ``input_ids = pad_id``, ``attention_mask = 0`` and
    ``labels = -100``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=HOST)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long, device=HOST)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=HOST)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long, device=HOST)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long, device=HOST)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(
    groups: Sequence[Sequence[Encoded]], pad_id: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Several groups' examples packed into rows without padding between them, each group in rows
    of its own (in order, so each group's tokens are contiguous, row after row), and how many
    rows each group has: ``input_ids``, ``labels`` and ``position_ids``, each ``(R, W)``.

    Rows hold at most ``W`` tokens, the longest example's length (a row is never longer than
    :func:`collate`'s); a group's examples fill its rows in order, a new row when the next one
    does not fit. Each example's positions start at 0, which is how transformers' attention
    masks tell packed sequences apart (given no ``attention_mask``:
    ``find_packed_sequence_indices``), and its first label is dropped (-100): as the first token
    it is never a target of its own sequence, and it must not become the target of the sequence
    before it. The end of a row is padding (``pad_id``, labels -100, positions from 0: a
    sequence of its own that nothing attends to). :func:`fedlora.scoring.labelled_logits` then
    gives each example's logits as :func:`collate` would, to the compute dtype's rounding."""
    examples = [e for group in groups for e in group]
    if not examples:
        raise ValueError("cannot pack an empty batch")
    width = max(len(e.input_ids) for e in examples)
    rows: list[list[Encoded]] = []
    counts = []
    for group in groups:
        start = len(rows)
        used = width
        for e in group:
            if used + len(e.input_ids) > width:
                rows.append([])
                used = 0
            rows[-1].append(e)
            used += len(e.input_ids)
        counts.append(len(rows) - start)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=HOST)  # (R, W)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=HOST)
    positions = torch.zeros((len(rows), width), dtype=torch.long, device=HOST)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids, dtype=torch.long, device=HOST)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:], dtype=torch.long, device=HOST)
            positions[r, at : at + n] = torch.arange(n, device=HOST)
            at += n
        positions[r, at:] = torch.arange(width - at, device=HOST)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}, counts


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _prompt_ids(prompt: str, tokenizer: Any) -> tuple[list[int], str]:
    """The prompt's ids and text (templated with the generation prompt, or ``prompt + "\\n"``)."""
    if _has_template(tokenizer):
        text = tokenizer.apply_chat_template(
            _messages(prompt), add_generation_prompt=True, tokenize=False
        )
        return _tokens(tokenizer, text), text
    text = f"{prompt}\n"
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if ids and ids[-1] == tokenizer.eos_token_id:  # a tokenizer that appends EOS itself
        ids.pop()
    return ids, text


def _tokens(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text that already holds its special tokens (a rendered template)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

"""Token ids with the loss on the response only; truncation; padding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedlora.data import Encoded, Example, collate, encode, encode_prompt
from fedlora.data.encode import LazyEncoded, truncate
from fedlora.errors import ConfigError
from fedlora.models import tiny_tokenizer

EXAMPLE = Example(prompt="What is the capital of France?", response="Paris.")


def response_part(e: Encoded) -> list[int]:
    return [label for label in e.labels if label != -100]


def test_labels_mask_exactly_the_templated_prompt() -> None:
    tokenizer = tiny_tokenizer()
    prompt = encode_prompt(EXAMPLE, tokenizer)

    (e,) = encode([EXAMPLE], tokenizer, max_length=256)

    assert tokenizer.decode(prompt) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert e.input_ids[: len(prompt)] == prompt
    assert e.labels[: len(prompt)] == [-100] * len(prompt)
    assert e.labels[len(prompt) :] == e.input_ids[len(prompt) :]
    assert tokenizer.decode(response_part(e)) == "Paris.<|im_end|>"  # ChatML's last "\n" dropped


def test_without_a_chat_template_the_prompt_ends_with_a_newline_and_the_response_with_eos() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None

    (e,) = encode([EXAMPLE], tokenizer, max_length=256)

    n_prompt = e.labels.count(-100)
    assert tokenizer.decode(e.input_ids[:n_prompt]) == "What is the capital of France?\n"
    assert tokenizer.decode(response_part(e)) == "Paris.<|im_end|>"


class MergingTokenizer:
    """Characters as ids, but ``"\\n"`` merges with the next character: prompts stop being
    prefixes of the templated conversation. A turn ends with ``"|"``, EOS (``"\\x00"``, id 0)
    and a newline."""

    chat_template = "fake"
    eos_token_id = 0

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, **_: Any
    ) -> str:
        text = "".join(f"{m['role']}:\n{m['content']}|\x00\n" for m in messages)
        return text + "assistant:\n" if add_generation_prompt else text

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids, i = [], 0
        while i < len(text):
            if text[i] == "\n" and i + 1 < len(text):
                ids.append(1000 + ord(text[i + 1]))
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_a_tokenizer_that_breaks_the_prefix_gets_prompt_and_response_tokenized_apart() -> None:
    tokenizer = MergingTokenizer()
    example = Example(prompt="Q", response="Ra")

    (e,) = encode([example], tokenizer, max_length=64)

    assert e.input_ids[: e.labels.count(-100)] == encode_prompt(example, tokenizer)
    assert response_part(e) == [ord("R"), ord("a"), ord("|"), 0]  # the "\n" after EOS dropped


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response() -> None:
    tokenizer = tiny_tokenizer()
    (full,) = encode([EXAMPLE], tokenizer, max_length=256)
    n_response = len(response_part(full))

    (cut,) = encode([EXAMPLE], tokenizer, max_length=n_response + 5)

    assert len(cut.input_ids) == n_response + 5
    assert cut.input_ids == full.input_ids[-(n_response + 5) :]  # the prompt's end survives
    assert response_part(cut) == response_part(full)


def test_a_response_longer_than_max_length_keeps_its_start_and_no_prompt() -> None:
    tokenizer = tiny_tokenizer()
    (full,) = encode([EXAMPLE], tokenizer, max_length=256)

    (cut,) = encode([EXAMPLE], tokenizer, max_length=3)

    assert cut.labels == cut.input_ids == response_part(full)[:3]
    assert tokenizer.decode(cut.input_ids) == "Par"


def test_a_response_without_tokens_names_the_example() -> None:
    with pytest.raises(ConfigError, match="example 7: the response has no tokens"):
        truncate([1, 2, 3], [], max_length=8, index=7)


def test_max_length_must_allow_a_token() -> None:
    with pytest.raises(ConfigError, match="max_length must be at least 1"):
        encode([EXAMPLE], tiny_tokenizer(), max_length=0)


def test_truncate_by_hand() -> None:
    e = truncate([1, 2, 3, 4], [5, 6], max_length=4)

    assert (e.input_ids, e.labels) == ([3, 4, 5, 6], [-100, -100, 5, 6])


def test_collate_pads_on_the_right() -> None:
    batch = [Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4], [4])]

    out = collate(batch, pad_id=9)

    assert torch.equal(out["input_ids"], torch.tensor([[1, 2, 3], [4, 9, 9]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(out["labels"], torch.tensor([[-100, 2, 3], [4, -100, -100]]))
    assert all(t.dtype == torch.long for t in out.values())


def test_encoded_rejects_labels_of_another_length() -> None:
    with pytest.raises(ValueError, match="same length"):
        Encoded([1, 2], [2])


@pytest.mark.slow
def test_smollm2_chat_template_keeps_the_prompt_a_prefix() -> None:
    from transformers import AutoTokenizer

    from fedlora.models import embedded_folder

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder())
    example = Example(prompt="Name a primary colour.", response="Blue is a primary colour.")

    (e,) = encode([example], tokenizer, max_length=256)

    prompt = encode_prompt(example, tokenizer)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(prompt)
    assert e.input_ids[: len(prompt)] == prompt and e.labels.count(-100) == len(prompt)
    assert tokenizer.decode(response_part(e)) == "Blue is a primary colour.<|im_end|>"


def test_lazy_encoding_gives_encodes_items_and_tokenizes_only_what_is_taken() -> None:
    tokenizer = tiny_tokenizer()
    examples = [Example(f"Question {i}?", f"Answer {i}.") for i in range(50)]
    eager = encode(examples, tokenizer, max_length=12)
    lazy = LazyEncoded(examples, tokenizer, max_length=12)
    assert len(lazy) == 50
    for i in (7, 3, 7, 49):
        assert lazy[i] == eager[i]
    assert sorted(lazy._done) == [3, 7, 49]
    with pytest.raises(ConfigError, match="max_length"):
        LazyEncoded(examples, tokenizer, max_length=0)

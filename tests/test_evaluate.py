"""Evaluation on the tiny random Llama: loss against hand-computed cross-entropy, choice
accuracy against direct log-likelihoods, ROUGE-L, and the model's mode left as it was."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fedlora.data import Example, encode_prompt
from fedlora.errors import ConfigError
from fedlora.evaluate import choice_log_likelihood, evaluate, generate_greedy
from fedlora.models import build_tiny

INSTRUCTIONS = [
    Example("Say hi.", "Hi!"),
    Example("Name three colours, please.", "Red, green and blue."),
    Example("What is 2+2?", "4"),
]
QUESTIONS = [
    Example("Is the sky blue?", "yes", choices=("yes", "no"), answer=0),
    Example("Pick a letter.", "B", choices=("A", "B", "C"), answer=1),
    Example("Which is a fruit?", "apple", choices=("apple", "chair"), answer=0),
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return build_tiny(seed=0)


@pytest.fixture(scope="module")
def sharp() -> tuple[Any, Any]:
    """The tiny model with its matrices scaled ×8: peaked, varied greedy outputs."""
    model, tokenizer = build_tiny(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model, tokenizer


def log_likelihood(model: Any, prompt: list[int], response: list[int]) -> float:
    """``Σ_t log p(response_t | prompt, response_<t)`` from one unpadded forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    return sum(float(log_p[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response))


def response_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"])


def test_loss_is_the_token_weighted_cross_entropy(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    total, tokens = 0.0, 0
    for e in INSTRUCTIONS:
        response = response_ids(tokenizer, e.response)
        total -= log_likelihood(model, encode_prompt(e, tokenizer), response)
        tokens += len(response)

    metrics = evaluate(model, tokenizer, INSTRUCTIONS, "instruction", batch_size=2)

    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert all(type(v) is float for v in metrics.values())


def test_the_batch_size_does_not_change_the_loss(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny

    one = evaluate(model, tokenizer, INSTRUCTIONS, "instruction", batch_size=1)
    three = evaluate(model, tokenizer, INSTRUCTIONS, "instruction", batch_size=3)

    assert one["loss"] == pytest.approx(three["loss"], abs=1e-5)


def test_accuracy_picks_the_most_likely_choice(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    best, worst = [], []
    for e in QUESTIONS:
        prompt = encode_prompt(e, tokenizer)
        scores = [log_likelihood(model, prompt, response_ids(tokenizer, c)) for c in e.choices]
        best.append(
            Example(e.prompt, e.response, choices=e.choices, answer=scores.index(max(scores)))
        )
        worst.append(
            Example(e.prompt, e.response, choices=e.choices, answer=scores.index(min(scores)))
        )

    right = evaluate(model, tokenizer, best, "multiple-choice", batch_size=4)
    wrong = evaluate(model, tokenizer, worst, "classification", batch_size=4)

    assert right["accuracy"] == 1.0
    assert wrong["accuracy"] == 0.0
    assert "rougeL" not in right


def test_shared_prompt_scores_equal_full_sequence_scores(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = [encode_prompt(Example(p, ""), tokenizer) for p in ("Short?", "A longer question?")]
    options = [
        [response_ids(tokenizer, c) for c in ("a", "bcd", "efghij")],
        [response_ids(tokenizer, c) for c in ("yes", "no", "maybe not")],
    ]

    scores, lengths = choice_log_likelihood(model, prompts, options, tokenizer.pad_token_id)

    expected = [
        [log_likelihood(model, p, o) for o in row] for p, row in zip(prompts, options, strict=True)
    ]
    assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert lengths.tolist() == [[len(o) for o in row] for row in options]


def test_option_scoring_continues_the_prompts_cache_through_the_supported_keyword(
    tiny: tuple[Any, Any],
) -> None:
    """The prompt's KV cache reaches the options through the keyword this transformers has,
    without the deprecation of ``past_key_values`` (removed in transformers 5.40), and the
    cache path is taken: the same scores as full sequences, with fewer tokens through."""
    import warnings

    import transformers

    from fedlora.scoring import cache_name

    model, tokenizer = tiny
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 24):
        assert cache_name() == "cache"
    seen: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*past_key_values.*")
            cached = evaluate(model, tokenizer, QUESTIONS, "multiple-choice", batch_size=2)
    finally:
        handle.remove()
    plain = evaluate(NoCache(model), tokenizer, QUESTIONS, "multiple-choice", batch_size=2)
    assert plain == pytest.approx(cached, rel=1e-6)
    assert len(seen) % 2 == 0 and len(seen) > 0  # prompts, then options on their cache


class NoCache(torch.nn.Module):
    """A model whose forward returns logits only: evaluation falls back to full sequences."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        kwargs["use_cache"] = False
        return SimpleNamespace(logits=self.inner(**kwargs).logits)


def test_a_model_without_a_kv_cache_gets_the_same_scores(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny

    cached = evaluate(model, tokenizer, QUESTIONS, "multiple-choice", batch_size=2)
    plain = evaluate(NoCache(model), tokenizer, QUESTIONS, "multiple-choice", batch_size=2)

    assert plain == pytest.approx(cached, rel=1e-6)


@pytest.mark.parametrize("max_length", [256, 48])  # 48: just above the longest sequence
def test_the_choice_loss_is_that_of_the_response(tiny: tuple[Any, Any], max_length: int) -> None:
    model, tokenizer = tiny
    as_instructions = [Example(e.prompt, e.response) for e in QUESTIONS]
    assert max(len(encode_prompt(e, tokenizer)) for e in QUESTIONS) + 8 <= 48

    choices = evaluate(model, tokenizer, QUESTIONS, "multiple-choice", max_length=max_length)
    plain = evaluate(model, tokenizer, as_instructions, "instruction", max_length=max_length)

    assert choices["loss"] == pytest.approx(plain["loss"], abs=1e-5)


def test_rouge_l_is_one_for_the_model_s_own_greedy_answer(sharp: tuple[Any, Any]) -> None:
    model, tokenizer = sharp
    prompts = [encode_prompt(e, tokenizer) for e in INSTRUCTIONS]
    greedy = [generate_greedy(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert all(any(ch.isalnum() for ch in text) for text in greedy)  # something to score
    own = [Example(e.prompt, text) for e, text in zip(INSTRUCTIONS, greedy, strict=True)]

    mine = evaluate(
        model, tokenizer, own, "instruction", rouge_samples=3, max_new_tokens=12, batch_size=2
    )
    theirs = evaluate(
        model, tokenizer, INSTRUCTIONS, "instruction", rouge_samples=3, max_new_tokens=12
    )

    assert mine["rougeL"] == pytest.approx(1.0)
    assert 0.0 <= theirs["rougeL"] < 1.0


def test_batched_generation_matches_one_by_one(sharp: tuple[Any, Any]) -> None:
    model, tokenizer = sharp
    prompts = [encode_prompt(e, tokenizer) for e in INSTRUCTIONS]  # three lengths: left padding

    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=8)

    assert batched == [generate_greedy(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]


def test_rouge_l_by_hand(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlora.evaluate as module

    model, tokenizer = tiny
    monkeypatch.setattr(module, "generate_greedy", lambda *args: ["the cat on the mat"])
    examples = [Example("Where?", "the cat sat on the mat")]

    metrics = evaluate(model, tokenizer, examples, "instruction", rouge_samples=1)

    # LCS 5 words; precision 5/5, recall 5/6: F = 2 P R / (P + R) = 10/11
    assert metrics["rougeL"] == pytest.approx(10 / 11)


@pytest.mark.parametrize("training", [True, False])
def test_the_model_runs_in_eval_mode_and_gets_its_mode_back(
    tiny: tuple[Any, Any], training: bool
) -> None:
    model, tokenizer = tiny
    model.train(training)
    seen: list[bool] = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(module.training))

    try:
        evaluate(model, tokenizer, QUESTIONS, "multiple-choice")
    finally:
        hook.remove()

    assert seen and not any(seen)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    model.eval()


def test_choices_are_required_for_multiple_choice(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny

    with pytest.raises(
        ConfigError, match="example 1: kind 'multiple-choice' needs at least 2 choices"
    ):
        evaluate(model, tokenizer, [QUESTIONS[0], INSTRUCTIONS[0]], "multiple-choice")


def test_no_examples_is_an_error(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny

    with pytest.raises(ConfigError, match="no examples"):
        evaluate(model, tokenizer, [], "instruction")


def test_a_run_with_progress_shows_a_bar_for_every_evaluation_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlora.config import load_config
    from fedlora.experiment import run_experiment

    tiny = Path(__file__).parent.parent / "configs" / "tiny.toml"
    cfg = load_config(tiny, ["rounds=1", "data.validation=8", "eval.rouge_samples=2"])
    run_experiment(cfg, tmp_path / "shown", progress=True)
    shown = capsys.readouterr().err
    assert "evaluate:" in shown and "evaluate validation:" in shown
    assert "/2 " in shown  # the bar counts batches: the held-out loss, then the Rouge-L batch
    run_experiment(cfg, tmp_path / "quiet", progress=False)
    assert "evaluate" not in capsys.readouterr().err

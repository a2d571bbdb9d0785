"""What a finished run hands on: its global model scored on any data the config accepts
(``fedlora eval``), and its answers beside the base model's (``fedlora generate``).

Both read the run folder's ``config.json`` and a PEFT adapter folder (the run's ``adapter/``,
or any other, e.g. a client's) through safetensors only (:func:`fedlora.adapters.read_adapter`),
never a pickle, and load the base model as the run did (its ``[model]`` section, which
``--set model.…`` may change). The adapter is checked against the model before anything is
scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora import adapters
from fedlora.config import RunConfig, config_with
from fedlora.data import Example, TaskKind, load_examples
from fedlora.data.sources import sample
from fedlora.errors import ConfigError
from fedlora.lora import LoRAFactors
from fedlora.models import LoadedModel, load_configured


@dataclass
class Trained:
    """A run's base model and the adapter that makes it the run's result."""

    cfg: RunConfig
    loaded: LoadedModel
    factors: dict[str, LoRAFactors]
    adapter: Path


def load_trained(run: Path, overrides: Sequence[str] = (), adapter: Path | None = None) -> Trained:
    """The base model of the run folder ``run`` and its global adapter (or ``adapter``), with
    ``key=value`` ``overrides`` on the run's config. A ConfigError names the missing file, or the
    module the adapter has and the model lacks (or its shape), before anything is scored."""
    from fedlora.experiment import run_config_of

    cfg = config_with(run_config_of(run), list(overrides), "")
    folder = adapter if adapter is not None else run / "adapter"
    if not (folder / "adapter_config.json").is_file():
        why = "" if adapter is not None else ": the run has not finished, or exports none"
        raise ConfigError(f"no adapter at {folder} (adapter_config.json is missing{why})")
    factors = adapters.read_adapter(folder)
    loaded = load_configured(cfg.model, cfg.seed)
    modules = dict(loaded.model.named_modules())
    for name, f in factors.items():
        weight = getattr(modules.get(name), "weight", None)
        if weight is None:
            raise ConfigError(f"adapter {folder}: module {name!r} is not in {cfg.model.name!r}")
        if tuple(weight.shape) != f.shape:
            raise ConfigError(
                f"adapter {folder}: module {name!r} is {f.shape[0]}×{f.shape[1]} in the adapter "
                f"but {weight.shape[0]}×{weight.shape[1]} in {cfg.model.name!r}"
            )
    return Trained(cfg, loaded, factors, folder)


def evaluate_trained(
    trained: Trained, data: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """The base model's and the adapter's metrics on the run's own scored sets (its held-out
    split, and beside it the benchmark, validation and held-out categories it scored), or, with
    ``data``, on every example of that source (``data.limit`` caps it with a seeded sample, which
    ``scored`` then says; ``data.kind`` and ``data.columns`` apply)."""
    from fedlora.federation import federation_data, server_party

    cfg = trained.cfg
    if data is None:
        fed = federation_data(cfg)
        examples, kind, scored = fed.heldout, fed.kind, fed.scored
        what = f"the run's {cfg.eval.split} split of {cfg.data.source}"
    else:
        every, kind = load_examples(data, kind=cfg.data.kind, columns=cfg.data.columns)
        examples, scored = sample(list(every), cfg.data.limit, cfg.seed), []
        what = f"every example of {data}"
        if len(examples) < len(every):
            what = f"a sample of {data} (data.limit, drawn with seed {cfg.seed})"
    party = server_party(cfg, trained.loaded, examples, kind, progress, scored)
    return {
        "run_adapter": str(trained.adapter),
        "scored": what,
        "examples": len(examples),
        "kind": kind,
        "base": party.evaluate(),
        "trained": party.evaluate_with(trained.factors),
    }


def comparison_markdown(result: dict[str, Any]) -> str:
    """A table of every metric: base model, with the adapter, and the change."""
    lines = [
        f"Scored on {result['scored']} ({result['examples']} examples, {result['kind']}); "
        f"adapter {result['run_adapter']}.",
        "",
        "| metric | base model | with the adapter | change |",
        "|---|---|---|---|",
    ]
    for metric, base in result["base"].items():
        value = result["trained"][metric]
        lines.append(f"| {metric} | {base:.4f} | {value:.4f} | {value - base:+.4f} |")
    return "\n".join(lines) + "\n"


def generate_answers(
    trained: Trained,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Answers of the base model and of the model with the adapter to each prompt (as a user
    turn, with the chat template): greedy, or sampled (``temperature > 0``, nucleus ``top_p``,
    seeded: the same seed gives the same answers)."""
    from fedlora.data.encode import encode_prompt
    from fedlora.evaluate import generate_greedy

    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(
            "max_new_tokens must be >= 1, temperature >= 0 and top_p in (0, 1], got "
            f"{max_new_tokens}, {temperature}, {top_p}"
        )
    model, tokenizer = trained.loaded.model, trained.loaded.tokenizer
    ids = [encode_prompt(Example(prompt=p, response=""), tokenizer) for p in prompts]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature else {}
    )

    def answer(m: Any) -> list[str]:
        torch.manual_seed(seed)
        with torch.no_grad():
            return generate_greedy(m, tokenizer, ids, max_new_tokens, **sampling)

    base = answer(model)
    peft_model = adapters.attach_factors(model, trained.cfg.model.targets, trained.factors)
    try:
        tuned = answer(peft_model)
    finally:
        trained.loaded.model = adapters.detach(peft_model)
    return {"base": base, "trained": tuned}


def harness_check(
    trained: Trained, data: str | None, folder: Path, progress: bool = True
) -> dict[str, Any]:
    """fedlora's accuracy and lm-evaluation-harness's ``acc`` on the same choice examples with
    the same adapter (:mod:`fedlora.harness`): the run's benchmark (``eval.benchmark``), or its
    held-out split when its data are choices, or every example of ``data``. Neither truncates
    (both run at the longest example's length), so they score the same tokens. ``folder`` gets
    the task files (and the tiny model's folder, which lm-eval loads)."""
    from fedlora.evaluate import choice_scores
    from fedlora.federation import benchmark_of, federation_data
    from fedlora.harness import run_harness, write_task
    from fedlora.models import DEFAULT_MODEL, TINY_MODEL, embedded_folder
    from fedlora.precision import dtype_name

    cfg, loaded = trained.cfg, trained.loaded
    examples: Sequence[Example]
    kind: TaskKind
    if data is not None:
        examples, kind = load_examples(
            data,
            kind=cfg.data.kind,
            columns=cfg.data.columns,
            limit=cfg.data.limit,
            seed=cfg.seed,
        )
        what = f"every example of {data}"
    elif (benchmark := benchmark_of(cfg)) is not None:
        examples, kind, what = benchmark.examples, benchmark.kind, f"the run's {benchmark.name}"
    else:
        fed = federation_data(cfg)
        examples, kind, what = fed.heldout, fed.kind, f"the run's held-out {cfg.data.source}"
    if kind == "instruction":
        raise ConfigError(
            f"--harness compares choice scoring, and {what} is instruction data: give "
            "--data mmlu (or a classification source), or a run with eval.benchmark"
        )
    examples = list(examples)
    write_task(examples, loaded.tokenizer, folder)
    longest = _longest(examples, loaded.tokenizer)
    model = adapters.attach_factors(loaded.model, cfg.model.targets, trained.factors)
    try:
        metrics, scores = choice_scores(
            model,
            loaded.tokenizer,
            examples,
            kind,
            batch_size=cfg.eval.batch_size,
            max_length=longest,
        )
    finally:
        loaded.model = adapters.detach(model)
    if cfg.model.name == DEFAULT_MODEL:
        pretrained = str(embedded_folder())
    elif cfg.model.name == TINY_MODEL:  # lm-eval loads a folder: write the tiny model's
        pretrained = str(folder / "base")
        loaded.model.save_pretrained(pretrained)
        loaded.tokenizer.save_pretrained(pretrained)
    else:
        pretrained = cfg.model.name
    dtype = dtype_name(loaded.dtype)
    harness = run_harness(
        folder, pretrained, trained.adapter, dtype, longest, cfg.eval.batch_size, str(loaded.device)
    )
    gaps = [  # each option's score relative to the first: lm-eval's extra token cancels
        abs((h[j] - h[0]) - (f[j] - f[0]))
        for f, h in zip(scores, harness["scores"], strict=True)
        for j in range(len(f))
    ]
    return {
        "scored": what,
        "examples": len(examples),
        "max_length": longest,
        "dtype": dtype,
        "fedlora_accuracy": metrics["accuracy"],
        "lm_eval_acc": harness["acc"],
        "max_relative_score_gap": max(gaps),
        "fedlora_scores": scores,
        "lm_eval_scores": harness["scores"],
    }


def _longest(examples: Sequence[Example], tokenizer: Any) -> int:
    """The longest prompt + choice of ``examples``, in tokens."""
    from dataclasses import replace

    from fedlora.data.encode import tokenize_pair

    return max(
        sum(map(len, tokenize_pair(replace(e, response=c), tokenizer)))
        for e in examples
        for c in e.choices
    )


def harness_markdown(result: dict[str, Any]) -> str:
    return (
        f"Scored on {result['scored']} ({result['examples']} examples, {result['dtype']}, "
        f"untruncated: up to {result['max_length']} tokens), with the run's adapter:\n\n"
        "| scorer | accuracy |\n|---|---|\n"
        f"| fedlora | {result['fedlora_accuracy']:.4f} |\n"
        f"| lm-evaluation-harness (`hf`, `peft=`) | {result['lm_eval_acc']:.4f} |\n\n"
        "Largest difference of an option's score relative to its question's first option: "
        f"{result['max_relative_score_gap']:.2e}\n"
    )

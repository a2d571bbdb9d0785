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
from fedlora.data import Example, load_examples
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
    ``data``, on every example of that source (``data.limit`` caps it; ``data.kind`` and
    ``data.columns`` apply)."""
    from fedlora.federation import federation_data, server_bench

    cfg = trained.cfg
    if data is None:
        fed = federation_data(cfg)
        examples, kind, scored = fed.heldout, fed.kind, fed.scored
        what = f"the run's {cfg.eval.split} split of {cfg.data.source}"
    else:
        loaded_examples, kind = load_examples(
            data,
            kind=cfg.data.kind,  # type: ignore[arg-type]
            columns=cfg.data.columns,
            limit=cfg.data.limit,
            seed=cfg.seed,
        )
        examples, scored, what = list(loaded_examples), [], f"every example of {data}"
    bench = server_bench(cfg, trained.loaded, examples, kind, progress, scored)
    return {
        "run_adapter": str(trained.adapter),
        "scored": what,
        "examples": len(examples),
        "kind": kind,
        "base": bench.evaluate(),
        "trained": bench.evaluate_with(trained.factors),
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

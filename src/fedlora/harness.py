"""A finished run's adapter scored by lm-evaluation-harness (``lm_eval``), the field's common
evaluation tool, on the same questions fedlora scores, as a check of fedlora's own scoring.

``fedlora eval RUN_DIR --harness`` writes the run's multiple-choice (or classification) examples
as a local lm-eval task (a JSONL file and its YAML; no hub), then runs lm-eval's ``hf`` model on
the run's base model folder with ``peft=`` the run's adapter, and puts lm-eval's ``acc`` beside
fedlora's ``accuracy`` on the same examples and adapter.

The task holds each example as fedlora scores it (:mod:`fedlora.evaluate`): the context is the
prompt as the chat template renders it with the generation prompt, each option the assistant
turn's text up to and including its end-of-turn token, joined with no delimiter; lm-eval sums
the option's log-likelihood and takes the argmax, as fedlora does. One difference is lm-eval's
own: it moves a context's trailing whitespace (ChatML's newline after ``assistant``) into every
continuation, so its per-option scores carry that one token more, the same for every option of a
question. The accuracy is the same; the options' scores differ by that constant.

Needs the package ``lm_eval`` (``pip install 'fedlora[harness]'``); runs offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedlora.data import Example
from fedlora.data.encode import tokenize_pair
from fedlora.errors import ConfigError

TASK = "fedlora_choices"


def write_task(examples: Sequence[Example], tokenizer: Any, folder: Path) -> Path:
    """``folder/TASK.jsonl`` and ``folder/TASK.yaml``: the examples as a local lm-eval
    multiple-choice task (module docstring); the folder, for ``TaskManager(include_path=…)``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, e in enumerate(examples):
        if len(e.choices) < 2 or not 0 <= e.answer < len(e.choices):
            raise ConfigError(f"example {i}: the harness scores choices; it has {e.choices!r}")
        pairs = [tokenize_pair(replace(e, response=c), tokenizer) for c in e.choices]
        context = tokenizer.decode(pairs[0][0])
        options = [tokenizer.decode(r) for _, r in pairs]
        rows.append({"context": context, "choices": options, "gold": e.answer})
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(
        "\n".join(
            [
                f"task: {TASK}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(data.resolve()))}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{context}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{gold}}"',
                'target_delimiter: ""',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "",
            ]
        )
    )
    return folder


def run_harness(
    task_folder: Path,
    pretrained: str,
    adapter: Path,
    dtype: str,
    max_length: int,
    batch_size: int,
    device: str,
) -> dict[str, Any]:
    """lm-eval's ``hf`` model on ``pretrained`` with ``peft=adapter``, on the task in
    ``task_folder``, on ``device`` (the run's, as ``str(torch.device)``): ``{"acc": …,
    "scores": [[option log-likelihoods] per example]}`` in the task's order."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "--harness needs the package lm_eval: pip install 'fedlora[harness]'"
        ) from None
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": pretrained,
            "peft": str(adapter),
            "dtype": dtype,
            "device": device,
            "max_length": max_length,
        },
        tasks=[TASK],
        batch_size=batch_size,
        task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
        log_samples=True,
        verbosity="ERROR",
    )
    if results is None:
        raise ConfigError("lm_eval returned no results")
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return {"acc": float(results["results"][TASK]["acc,none"]), "scores": scores}

"""The one record type every data source produces, and the task kinds."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.schema import TASK_KINDS, TaskKind

__all__ = ["TASK_KINDS", "Example", "TaskKind"]


@dataclass(frozen=True)
class Example:
    """One example, whatever its source.

    ``prompt``: the user turn (an instruction, an article to classify, a question).
    ``response``: the target assistant turn (for classification and multiple choice, the correct
    option as the model should write it, e.g. ``"sport"`` or ``"B"``).
    ``category``: what partitions group by (MMLU subject, chatterbot category, news class).
    ``choices``: the options scored by log-likelihood (classification, multiple choice), each
    written as a possible response; ``answer`` is the index of the correct one (-1: none).
    """

    prompt: str
    response: str
    category: str = ""
    choices: tuple[str, ...] = ()
    answer: int = -1

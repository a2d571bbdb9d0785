"""Tables of rows from user files and hub data sets, and their mapping to examples.

A :class:`Table` holds rows read from a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file
(:func:`read_file`) or a hub data set (:func:`read_hub`); :func:`rows_to_examples` maps its
columns to :class:`~fedlora.data.examples.Example` fields. Errors name the file and the line
(JSON Lines, CSV) or row (JSON, Parquet, hub) and the column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data.examples import Example, TaskKind
from fedlora.errors import ConfigError

FILE_FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet")


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


# ------------------------------------------------------------------------------------ hub data


def read_hub(name: str, split: str) -> Table:
    """``datasets.load_dataset(name, split=split)`` as a table (needs a network or a cache)."""
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

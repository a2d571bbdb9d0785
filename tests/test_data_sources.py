"""Data sources: builtins shipped in packages, user files with column mappings, hub data sets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedlora.data import BUILTIN_SOURCES, Example, load_examples
from fedlora.errors import ConfigError

# ---------------------------------------------------------------------------------- builtins


@pytest.mark.parametrize(
    ("source", "kind", "count", "categories"),
    [
        ("mmlu", "multiple-choice", 14_042, 57),  # 14,044 lines less 2 header-like rows
        ("chatterbot", "instruction", 2_306, 21),  # 2,025 conversations → consecutive turn pairs
        ("bbc-news", "classification", 2_225, 5),
    ],
)
def test_builtin_sources_load_what_their_packages_ship(
    source: str, kind: str, count: int, categories: int
) -> None:
    examples, got_kind = load_examples(source)

    assert got_kind == kind
    assert len(examples) == count
    assert len({e.category for e in examples}) == categories
    assert all(e.prompt and e.response for e in examples)


def test_chatterbot_reads_the_same_with_and_without_libyaml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The corpus is read with libyaml's safe loader when PyYAML has it; the pure-Python safe
    loader gives the same examples."""
    import yaml

    assert hasattr(yaml, "CSafeLoader"), "PyYAML without libyaml: the fast path is not tested"
    loaders: list[type] = []
    load = yaml.load

    def spy(stream: str, Loader: type) -> object:
        loaders.append(Loader)
        return load(stream, Loader=Loader)

    monkeypatch.setattr(yaml, "load", spy)
    fast, _ = load_examples("chatterbot")
    c_loader = yaml.CSafeLoader
    assert set(loaders) == {c_loader}
    monkeypatch.delattr(yaml, "CSafeLoader")
    slow, _ = load_examples("chatterbot")
    assert set(loaders) == {c_loader, yaml.SafeLoader}
    assert fast == slow and len(fast) == 2_306


def test_mmlu_prompt_lists_the_options_and_the_response_is_the_letter() -> None:
    examples, _ = load_examples("mmlu")

    first = examples[0]
    lines = first.prompt.split("\n")
    assert lines[1:5] == [
        "A. Wrong, Wrong",
        "B. Wrong, Not wrong",
        "C. Not wrong, Wrong",
        "D. Not wrong, Not wrong",
    ]
    assert lines[-1] == "Answer with the letter of the correct option."
    assert (first.response, first.answer, first.category) == ("D", 3, "moral scenarios")
    assert all(e.choices == ("A", "B", "C", "D") for e in examples)
    assert all(e.choices[e.answer] == e.response for e in examples)
    assert not any(e.prompt.startswith("question\n") for e in examples)  # header rows skipped


def test_bbc_news_has_five_sorted_classes_and_short_prompts() -> None:
    examples, _ = load_examples("bbc-news")

    classes = ("business", "entertainment", "politics", "sports", "tech")
    assert Counter(e.category for e in examples) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    assert all(e.choices == classes and e.choices[e.answer] == e.response for e in examples)
    assert all(e.response == e.category for e in examples)
    assert max(len(e.prompt) for e in examples) < 800  # article cut to ~600 characters
    assert examples[0].prompt.split("\n\n")[1] == "Ad sales boost Time Warner profit"  # the title


def test_chatterbot_pairs_each_turn_with_the_next() -> None:
    examples, _ = load_examples("chatterbot")

    assert examples[0] == Example(
        prompt="What is AI?",
        response="Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.",
        category="AI",
    )
    i = examples.index(
        Example("I am working on a project", "What are you working on?", "conversations")
    )
    assert examples[i + 1] == Example(
        "What are you working on?", "I am baking a cake.", "conversations"
    )


def test_limit_takes_a_seeded_sample_in_source_order() -> None:
    full, _ = load_examples("bbc-news")

    a, _ = load_examples("bbc-news", limit=40, seed=1)
    b, _ = load_examples("bbc-news", limit=40, seed=1)
    c, _ = load_examples("bbc-news", limit=40, seed=2)

    assert a == b and a != c and len(a) == 40
    rest = iter(full)
    assert all(e in rest for e in a)  # a subsequence of the full list (it holds duplicates)


def test_a_builtin_rejects_a_kind_it_cannot_serve() -> None:
    with pytest.raises(ConfigError, match="needs at least 2 choices"):
        load_examples("chatterbot", kind="classification")


# -------------------------------------------------------------------------------- user files


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_a_column_mapping(tmp_path: Path) -> None:
    file = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "2+2?", "answer": "4", "topic": "math"},
            {"question": "Hi", "answer": "Hello", "topic": "chat"},
        ],
    )

    examples, kind = load_examples(
        "jsonl",
        path=str(file),
        columns={"prompt": "question", "response": "answer", "category": "topic"},
    )

    assert kind == "instruction"
    assert examples == [Example("2+2?", "4", "math"), Example("Hi", "Hello", "chat")]


def test_csv_classification_takes_the_sorted_distinct_responses_as_choices(tmp_path: Path) -> None:
    file = tmp_path / "news.csv"
    file.write_text(
        'text,label\n"Goal, at last",sport\nRates rise,economy\nA match,sport\n', encoding="utf-8"
    )

    examples, kind = load_examples(
        str(file), kind="classification", columns={"prompt": "text", "response": "label"}
    )

    assert kind == "classification"
    assert [e.prompt for e in examples] == ["Goal, at last", "Rates rise", "A match"]
    assert all(e.choices == ("economy", "sport") for e in examples)
    assert [e.answer for e in examples] == [1, 0, 1]


def test_parquet_multiple_choice_with_a_list_column_and_no_response(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "mc.parquet"
    table = pa.table(
        {
            "q": ["Sky?", "Grass?"],
            "options": [["blue", "red"], ["pink", "green", "grey"]],
            "gold": [0, 1],
        }
    )
    pq.write_table(table, file)

    examples, kind = load_examples(
        str(file), columns={"prompt": "q", "choices": "options", "answer": "gold"}
    )

    assert kind == "multiple-choice"
    assert examples == [
        Example("Sky?", "blue", "", ("blue", "red"), 0),
        Example("Grass?", "green", "", ("pink", "green", "grey"), 1),
    ]


def test_json_array_with_default_columns_and_letter_answers(tmp_path: Path) -> None:
    file = tmp_path / "mc.json"
    rows = [{"prompt": "Pick", "response": "y", "choices": "x|y", "answer": "B"}]
    file.write_text(json.dumps(rows, indent=2), encoding="utf-8")

    examples, kind = load_examples(str(file))

    assert kind == "multiple-choice"
    assert examples == [Example("Pick", "y", "", ("x", "y"), 1)]


def test_invalid_jsonl_names_the_file_line_and_column(tmp_path: Path) -> None:
    file = tmp_path / "data.jsonl"
    file.write_text(
        '{"prompt": "a", "response": "b"}\n\n{"prompt": "c" "response": "d"}\n', encoding="utf-8"
    )

    with pytest.raises(
        ConfigError,
        match=r"data\.jsonl line 3: invalid JSON \(Expecting ',' delimiter: column 16\)",
    ):
        load_examples("jsonl", path=str(file))


def test_a_csv_record_with_missing_fields_names_its_line(tmp_path: Path) -> None:
    file = tmp_path / "d.csv"
    file.write_text("prompt,response\na,b\nc\n", encoding="utf-8")

    with pytest.raises(
        ConfigError, match=r"d\.csv line 3: 1 fields, but the header \(line 1\) has 2"
    ):
        load_examples(str(file))


def test_an_unknown_column_lists_the_available_ones(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])

    with pytest.raises(
        ConfigError, match=r"no column 'prompt_text'.*available columns: 'question', 'answer'"
    ):
        load_examples(str(file), columns={"prompt": "prompt_text", "response": "answer"})


def test_a_missing_value_names_the_line_and_column(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])

    with pytest.raises(
        ConfigError, match=r"d\.jsonl line 2: column 'response' \(response\) is missing"
    ):
        load_examples(str(file))


def test_without_a_prompt_column_the_error_shows_how_to_map_one(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "p", "output": "r"}])

    with pytest.raises(
        ConfigError, match=r"no prompt column; map one with columns=.*'instruction', 'output'"
    ):
        load_examples(str(file))


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_an_empty_file_is_an_error(tmp_path: Path, name: str) -> None:
    file = tmp_path / name
    file.write_text("\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="is empty"):
        load_examples(str(file))


def test_an_unknown_source_lists_builtins_and_formats() -> None:
    with pytest.raises(ConfigError) as err:
        load_examples("alpaca")

    message = str(err.value)
    assert all(name in message for name in BUILTIN_SOURCES)
    assert "jsonl, json, csv, parquet" in message and "hub:NAME" in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.csv does not exist"):
        load_examples("csv", path=str(tmp_path / "nope.csv"))


# ------------------------------------------------------------------------------ hub data sets


def test_hub_data_sets_go_through_the_same_column_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[str, str]] = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list(
            [
                {
                    "question": "Capital of France?",
                    "choices": ["Rome", "Paris"],
                    "answer": 1,
                    "subject": "geo",
                },
                {"question": "2+3?", "choices": ["5", "6"], "answer": 0, "subject": "math"},
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    examples, kind = load_examples(
        "hub:cais/mmlu",
        split="test",
        columns={
            "prompt": "question",
            "choices": "choices",
            "answer": "answer",
            "category": "subject",
        },
    )

    assert calls == [("cais/mmlu", "test")]
    assert kind == "multiple-choice"
    assert examples[0] == Example("Capital of France?", "Paris", "geo", ("Rome", "Paris"), 1)
    assert examples[1].response == "5"


def test_a_hub_failure_says_what_to_use_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(name: str, split: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)

    with pytest.raises(
        ConfigError, match=r"cannot load hub data set 'tatsu-lab/alpaca'.*builtin source"
    ):
        load_examples("hub:tatsu-lab/alpaca")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.json",
            '[\n  {"prompt": "a", "response": "b"},\n  {"prompt": }\n]',
            r"bad\.json line 3: invalid JSON",
        ),
        ("dup.csv", "prompt,prompt\na,b\n", r"dup\.csv line 1: repeated column names"),
        ("big.csv", "prompt,response\n" + "a" * 200_000 + ",b\n", r"big\.csv line 2: invalid CSV"),
        ("bad.parquet", "not parquet at all", r"bad\.parquet: not a readable Parquet file"),
    ],
)
def test_an_unreadable_file_names_itself_and_where(
    name: str, content: str, message: str, tmp_path: Path
) -> None:
    file = tmp_path / name
    file.write_text(content, encoding="utf-8")

    with pytest.raises(ConfigError, match=message):
        load_examples(str(file))


def _choice_file(tmp_path: Path, choices: Any, answer: Any) -> Path:
    file = tmp_path / "mc.jsonl"
    row = {"prompt": "Pick", "response": "y", "choices": choices, "answer": answer}
    file.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return file


@pytest.mark.parametrize(
    ("choices", "answer", "expected"),
    [
        ('["x", "y", "z"]', 2, 2),  # choices as a JSON string, answer by index
        (["x", "y", "z"], "z", 2),  # answer by its text
        (["x", "y", "z"], "c", 2),  # answer by letter, either case
        (["x", "y", "z"], "1", 1),  # answer as a digit string
    ],
)
def test_choices_and_answers_in_every_accepted_form(
    choices: Any, answer: Any, expected: int, tmp_path: Path
) -> None:
    (example,), kind = load_examples(str(_choice_file(tmp_path, choices, answer)))

    assert kind == "multiple-choice" and example.choices == ("x", "y", "z")
    assert example.answer == expected


@pytest.mark.parametrize(
    ("choices", "answer", "message"),
    [
        ('["x", "y"', 0, r"choices '\[\"x\", \"y\"' is not a JSON list"),
        (["x"], 0, "choices must be a list of at least 2 options"),
        (["x", "y"], 2, r"answer 2 is neither a choice, an index nor a letter of the 2 choices"),
        (["x", "y"], "w", "answer 'w' is neither a choice"),
        (["x", "y"], True, "answer True is neither a choice"),
    ],
)
def test_bad_choices_or_answers_name_the_line(
    choices: Any, answer: Any, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_examples(str(_choice_file(tmp_path, choices, answer)))
    assert "mc.jsonl line 1" in str(err.value)

"""Partitions across clients (flwr-datasets partitioners) and the heldout split."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest

from fedlora.data import Example, partition, split_heldout
from fedlora.errors import ConfigError

SIZES = {"art": 40, "bio": 30, "chem": 20, "law": 10}  # 100 examples, 4 unequal categories


def make_examples(sizes: dict[str, int] = SIZES) -> list[Example]:
    return [
        Example(prompt=f"{cat}-{i}", response="r", category=cat)
        for cat, n in sizes.items()
        for i in range(n)
    ]


def prompts(clients: list[list[Example]]) -> list[list[str]]:
    return [[e.prompt for e in c] for c in clients]


SCHEME_CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("classes", {"classes_per_client": 2}),
    ("task", {}),
]


@pytest.mark.parametrize(("scheme", "options"), SCHEME_CASES)
def test_clients_are_disjoint_non_empty_and_deterministic(
    scheme: str, options: dict[str, Any]
) -> None:
    examples = make_examples()

    a = partition(examples, 4, scheme, seed=3, **options)
    b = partition(examples, 4, scheme, seed=3, **options)

    assert len(a) == 4 and all(a)
    flat = [p for client in prompts(a) for p in client]
    assert len(flat) == len(set(flat))
    assert prompts(a) == prompts(b)


@pytest.mark.parametrize(("scheme", "options"), SCHEME_CASES[:3])
def test_another_seed_gives_another_partition(scheme: str, options: dict[str, Any]) -> None:
    examples = make_examples()

    a = partition(examples, 4, scheme, seed=0, **options)
    b = partition(examples, 4, scheme, seed=1, **options)

    assert [sorted(c) for c in prompts(a)] != [sorted(c) for c in prompts(b)]


def test_iid_covers_the_data_in_near_equal_shares() -> None:
    examples = make_examples()

    clients = partition(examples, 3, "iid")

    assert sorted(p for c in prompts(clients) for p in c) == sorted(e.prompt for e in examples)
    assert sorted(len(c) for c in clients) == [33, 33, 34]


def test_dirichlet_with_small_alpha_skews_the_categories() -> None:
    examples = make_examples({c: 4 * n for c, n in SIZES.items()})  # 400 examples

    skewed = partition(examples, 4, "dirichlet", alpha=0.1, seed=0)
    iid = partition(examples, 4, "iid", seed=0)

    def majority_share(client: list[Example]) -> float:
        return Counter(e.category for e in client).most_common(1)[0][1] / len(client)

    assert sum(len(c) for c in skewed) == len(examples)  # everyone gets placed
    assert max(majority_share(c) for c in iid) < 0.6  # the global share of "art" is 0.4
    assert min(majority_share(c) for c in skewed) > 0.6
    histograms = {tuple(sorted(Counter(e.category for e in c).items())) for c in skewed}
    assert len(histograms) == 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_gives_at_most_k_categories_per_client(k: int) -> None:
    examples = make_examples()

    clients = partition(examples, 6, "classes", classes_per_client=k, seed=5)

    assert all(len({e.category for e in c}) <= k for c in clients)
    assert {e.category for c in clients for e in c} == set(SIZES)  # 6 clients ≥ 4 categories


def test_task_gives_each_client_one_whole_category() -> None:
    examples = make_examples()

    clients = partition(examples, 4, "task")

    assert [Counter(e.category for e in c) for c in clients] == [{c: n} for c, n in SIZES.items()]


def test_task_needs_one_client_per_category() -> None:
    with pytest.raises(
        ConfigError, match=r"the data has 4 \('art', 'bio', 'chem', 'law'\).*num_clients to 4"
    ):
        partition(make_examples(), 3, "task")


@pytest.mark.parametrize(
    ("num_clients", "scheme", "options", "match"),
    [
        (0, "iid", {}, "num_clients must be a positive integer"),
        (101, "iid", {}, "101 clients but only 100 examples"),
        (
            2,
            "shards",
            {},
            "unknown partition scheme 'shards'; allowed: iid, dirichlet, classes, task",
        ),
        (2, "classes", {"classes_per_client": 5}, r"between 1 and the number of categories \(4\)"),
        (2, "dirichlet", {"alpha": 0.0}, "alpha must be a positive number"),
        (
            60,
            "classes",
            {"classes_per_client": 4},
            "Label: art is needed to be assigned to more partitions",
        ),
    ],
)
def test_bad_settings_are_errors(
    num_clients: int, scheme: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        partition(make_examples(), num_clients, scheme, **options)


def test_a_client_left_empty_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    module = sys.modules["fedlora.data.partition"]  # the package exports the function

    class EmptySecond:
        dataset: Any = None

        def load_partition(self, i: int) -> dict[str, list[int]]:
            return {"index": [] if i == 1 else [i]}

    monkeypatch.setattr(module, "_partitioner", lambda *args: (EmptySecond(), list(range(100))))

    with pytest.raises(ConfigError, match="client 1 would get no examples"):
        partition(make_examples(), 3, "iid")


# --------------------------------------------------------------------------------- heldout


@pytest.mark.parametrize(("size", "held"), [(10, 10), (0.25, 25)])
def test_split_heldout_takes_a_count_or_a_fraction(size: int | float, held: int) -> None:
    examples = make_examples()

    train, heldout = split_heldout(examples, size, seed=4)

    assert len(heldout) == held and len(train) == 100 - held
    assert sorted(e.prompt for e in train + heldout) == sorted(e.prompt for e in examples)
    assert [examples.index(e) for e in heldout] == sorted(examples.index(e) for e in heldout)


def test_split_heldout_is_seeded() -> None:
    examples = make_examples()

    a = split_heldout(examples, 10, seed=1)
    b = split_heldout(examples, 10, seed=1)
    c = split_heldout(examples, 10, seed=2)

    assert a == b and a[1] != c[1]


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (0, "gives 0 heldout examples"),
        (100, "gives 100 heldout examples"),
        (0.001, "gives 0 heldout examples"),
        (0.0, r"heldout fraction must lie in \(0, 1\), got 0.0"),
        (1.0, r"heldout fraction must lie in \(0, 1\), got 1.0"),
    ],
)
def test_split_heldout_refuses_an_empty_side(size: int | float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        split_heldout(make_examples(), size)


def test_the_validation_split_is_apart_from_the_test_split_and_from_every_client() -> None:
    from pathlib import Path

    from fedlora.config import load_config
    from fedlora.federation import federation_data

    tiny = Path(__file__).parent.parent / "configs" / "tiny.toml"
    plain = federation_data(load_config(tiny, []))
    both = federation_data(load_config(tiny, ["data.validation=10"]))
    alone = federation_data(load_config(tiny, ["data.validation=10", "eval.split=validation"]))

    assert both.heldout == plain.heldout  # the test split does not move when a validation split
    assert plain.scored == [] and alone.scored == []  # is taken; scored beside it, by its name:
    [beside] = both.scored
    assert beside.name == "validation" and beside.rouge and beside.kind == both.kind
    validation = alone.heldout  # the same examples when scored in the test split's place
    assert beside.examples == validation and len(validation) == 10
    assert both.parts == alone.parts  # either way the clients train on the same data
    plain_parts, parts = plain.parts, both.parts
    # the data has repeated examples, so count them: the training pool without a validation
    # split (all but the test split) is exactly the clients' examples plus the validation ones
    pool = Counter(repr(e) for p in plain_parts for e in p)
    assert Counter(repr(e) for p in parts for e in p) + Counter(map(repr, validation)) == pool


def test_scoring_the_validation_split_needs_one() -> None:
    from pathlib import Path

    from fedlora.config import load_config

    tiny = Path(__file__).parent.parent / "configs" / "tiny.toml"
    with pytest.raises(ConfigError, match=r"needs a validation split: set data\.validation"):
        load_config(tiny, ["eval.split=validation"])
    with pytest.raises(ConfigError, match=r"eval\.split"):
        load_config(tiny, ["eval.split=test", "data.validation=4"])
    with pytest.raises(ConfigError, match=r"data\.validation must be >= 0"):
        load_config(tiny, ["data.validation=-1"])


def test_dirichlet_partitions_many_small_clients() -> None:
    # Claim 2's setting: 100 clients share ~1,900 examples of 15 categories (~19 each). With
    # flwr-datasets' minimum of ~n/2K = 9 per client, its ten Dirichlet draws often all fail.
    examples = make_examples({f"cat{c:02d}": 125 for c in range(15)})
    for seed in range(5):
        clients = partition(examples, 100, "dirichlet", alpha=0.5, seed=seed)
        assert sum(len(c) for c in clients) == len(examples)
        assert min(len(c) for c in clients) >= len(examples) // 400

"""Client ranks: explicit lists and the papers' distributions."""

from __future__ import annotations

import pytest

from fedlora.errors import ConfigError
from fedlora.ranks import FLORA_RANKS, client_ranks, type_probabilities


def test_explicit_lists_cycle_and_flora_is_the_papers_list() -> None:
    assert client_ranks([8, 4], 5, [], 0) == [8, 4, 8, 4, 8]
    assert client_ranks("flora", 10, [], 0) == list(FLORA_RANKS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("uniform", [0.25, 0.25, 0.25, 0.25]),
        ("heavy-tail-light", [0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3]),
        ("heavy-tail-strong", [0.2 / 3, 0.2 / 3, 0.2 / 3, 0.8]),
        ("normal", [1 / 8, 3 / 8, 3 / 8, 1 / 8]),
    ],
)
def test_type_probabilities(name: str, expected: list[float]) -> None:
    assert type_probabilities(name, 4) == pytest.approx(expected)


def test_distributions_are_seeded_and_follow_their_shape() -> None:
    light = client_ranks("heavy-tail-light", 2000, [8, 30, 200], seed=1)
    strong = client_ranks("heavy-tail-strong", 2000, [8, 30, 200], seed=1)

    assert light == client_ranks("heavy-tail-light", 2000, [8, 30, 200], seed=1)
    assert light != client_ranks("heavy-tail-light", 2000, [8, 30, 200], seed=2)
    assert 0.76 < light.count(8) / 2000 < 0.84
    assert 0.76 < strong.count(200) / 2000 < 0.84


def test_unknown_distribution_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="heavy-tail-light"):
        client_ranks("pareto", 3, [4, 8], 0)

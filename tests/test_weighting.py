"""Client weights p_k: by data size, uniform, or given per client."""

from __future__ import annotations

import pytest

from conftest import make_updates
from fedlora.errors import UpdateError
from fedlora.weighting import client_weights


def test_weights_by_examples_uniform_and_given() -> None:
    updates = make_updates([1, 1, 1], examples=[1, 2, 5])

    assert client_weights(updates) == pytest.approx([0.125, 0.25, 0.625])
    assert client_weights(updates, "uniform") == pytest.approx([1 / 3] * 3)
    assert client_weights(updates, {"c0": 2, "c1": 2, "c2": 4}) == pytest.approx([0.25, 0.25, 0.5])


def test_missing_given_weight_names_the_client() -> None:
    updates = make_updates([1, 1])

    with pytest.raises(UpdateError, match="no weight given") as err:
        client_weights(updates, {"c0": 1.0})

    assert err.value.client == "c1"


def test_unknown_weighting_lists_the_choices() -> None:
    with pytest.raises(UpdateError, match="'examples', 'uniform'"):
        client_weights(make_updates([1]), "size")  # type: ignore[arg-type]


def test_no_clients_is_an_error() -> None:
    with pytest.raises(UpdateError, match="empty"):
        client_weights([])

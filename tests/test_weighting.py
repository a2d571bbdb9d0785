"""Client weights p_k: by data size, uniform, or given per client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_updates
from fedlora.config import load_config
from fedlora.errors import ConfigError, UpdateError
from fedlora.experiment import run_experiment
from fedlora.weighting import client_weights, configured_weighting

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


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


def test_custom_weights_come_from_the_config_per_registered_client() -> None:
    assert configured_weighting("uniform", None, 3) == "uniform"
    given = configured_weighting("custom", [4.0, 1.0], 3)
    assert given == {"client-0000": 4.0, "client-0001": 1.0, "client-0002": 4.0}  # cycled


@pytest.mark.parametrize(
    "overrides",
    [
        ["weighting=custom"],
        ["clients.weights=[1,2,3]"],
        ["weighting=custom", "clients.weights=[1,0]"],
    ],
)
def test_custom_weighting_needs_positive_weights(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"clients\.weights"):
        load_config(TINY, overrides)


@pytest.mark.parametrize("weights", [None, []])
def test_custom_weighting_without_weights_says_which_key_is_missing(
    weights: list[float] | None,
) -> None:
    with pytest.raises(UpdateError) as err:
        configured_weighting("custom", weights, 3)
    assert str(err.value) == 'weighting = "custom" needs clients.weights'


@pytest.mark.runner
def test_a_run_with_custom_weights_aggregates_with_them(tmp_path: Path) -> None:
    """Equal custom weights are uniform weighting, exactly; unequal ones change the result."""

    def adapter(*overrides: str) -> dict[str, torch.Tensor]:
        out = tmp_path / "-".join(overrides).replace("=", "_").replace(",", "_")
        run_experiment(load_config(TINY, ["rounds=1", *overrides]), out, progress=False)
        return load_file(str(out / "adapter" / "adapter_model.safetensors"))

    uniform = adapter("weighting=uniform")
    equal = adapter("weighting=custom", "clients.weights=[2,2,2]")
    skewed = adapter("weighting=custom", "clients.weights=[10,1,1]")
    assert all(torch.equal(uniform[k], equal[k]) for k in uniform)
    assert not all(torch.allclose(uniform[k], skewed[k]) for k in uniform)

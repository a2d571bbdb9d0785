"""Core types: shapes, scaling folded once, and validation that names the culprit."""

from __future__ import annotations

import pytest
import torch

from conftest import make_updates
from fedlora.errors import UpdateError
from fedlora.lora import ClientUpdate, LoRAFactors, fold_scaling, unfold_scaling, validate_updates


def test_rank_and_shape_are_read_from_the_tensors() -> None:
    f = LoRAFactors(A=torch.zeros(3, 7), B=torch.zeros(5, 3))

    assert (f.rank, f.d_in, f.d_out, f.shape) == (3, 7, 5, (5, 7))


@pytest.mark.parametrize(
    ("A", "B", "message"),
    [
        (
            torch.zeros(3, 7),
            torch.zeros(5, 2),
            "rank mismatch: A(3, 7) has 3 rows but B(5, 2) has 2 columns (expected A: (r, d_in), "
            "B: (d_out, r))",
        ),
        (torch.zeros(3), torch.zeros(5, 3), "LoRA factors must be matrices, got A(3,) and B(5, 3)"),
        (
            torch.zeros(3, 7),
            torch.zeros(5, 3, 1),
            "LoRA factors must be matrices, got A(3, 7) and B(5, 3, 1)",
        ),
        (
            torch.zeros(3, 7, dtype=torch.long),
            torch.zeros(5, 3, dtype=torch.long),
            "LoRA factors must be floating point, got torch.int64/torch.int64",
        ),
        (
            torch.zeros(3, 7),
            torch.zeros(5, 3, dtype=torch.long),
            "LoRA factors must be floating point, got torch.float32/torch.int64",
        ),
        (
            torch.zeros(3, 7),
            torch.zeros(5, 3, dtype=torch.float64),
            "A and B must share dtype and device, got torch.float32@cpu and torch.float64@cpu",
        ),
    ],
)
def test_malformed_factors_are_rejected(A: torch.Tensor, B: torch.Tensor, message: str) -> None:
    # the whole message: what was wrong and what was expected
    with pytest.raises(ValueError) as err:
        LoRAFactors(A=A, B=B)
    assert str(err.value) == message


def test_scaling_is_folded_into_b_and_unfolds_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    A0, B0 = torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen)

    folded = fold_scaling(A0, B0, 16 / 4)
    A1, B1 = unfold_scaling(folded, 16 / 4)

    assert torch.allclose(folded.delta(), 4.0 * B0 @ A0)
    assert folded.A is A0  # A is untouched: FFA-LoRA's frozen A stays bitwise equal
    assert torch.equal(A1, A0) and torch.allclose(B1, B0)


@pytest.mark.parametrize("scaling", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_scaling_is_rejected(scaling: float) -> None:
    with pytest.raises(ValueError, match="positive finite"):
        fold_scaling(torch.zeros(1, 1), torch.zeros(1, 1), scaling)


def test_default_component_index_is_the_first_r() -> None:
    (update,) = make_updates([3])

    assert update.indices("q_proj").tolist() == [0, 1, 2]


def test_unexpected_module_is_named() -> None:
    updates = make_updates([2, 2])
    extra = {**updates[1].factors, "k_proj": updates[1].factors["q_proj"]}
    updates[1] = ClientUpdate("c1", extra, 4)

    with pytest.raises(UpdateError, match=r"unexpected \['k_proj'\]") as err:
        validate_updates(updates)

    assert err.value.client == "c1"


def test_mixed_dtypes_and_bool_example_counts_are_rejected() -> None:
    updates = make_updates([2, 2])
    doubled = {m: f.to(torch.float64) for m, f in updates[1].factors.items()}

    with pytest.raises(UpdateError, match=r"dtype torch\.float64"):
        validate_updates([updates[0], ClientUpdate("c1", doubled, 3)])
    with pytest.raises(UpdateError, match="must be an int"):
        validate_updates([ClientUpdate("c0", updates[0].factors, True)])


def test_an_update_without_modules_is_rejected() -> None:
    with pytest.raises(UpdateError, match="no LoRA modules"):
        validate_updates([ClientUpdate("c0", {}, 3)])


@pytest.mark.parametrize("scaling", [0.0, -1.0, float("inf"), float("nan")])
def test_unfolding_needs_a_positive_finite_scaling(scaling: float) -> None:
    f = LoRAFactors(A=torch.ones(1, 2), B=torch.ones(3, 1))
    with pytest.raises(ValueError, match="LoRA scaling must be a positive finite number, got"):
        unfold_scaling(f, scaling)


def test_unfolding_a_scaling_below_one_gives_back_the_peft_factors() -> None:
    A0, B0 = torch.ones(1, 2), torch.full((3, 1), 2.0)
    A, B = unfold_scaling(fold_scaling(A0, B0, 0.5), 0.5)
    assert torch.equal(A, A0) and torch.equal(B, B0)

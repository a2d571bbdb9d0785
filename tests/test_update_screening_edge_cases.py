"""Pins behaviours of :mod:`fedlora.lora` that the mutation run showed were unchecked: the device
a dense delta or a default component index lands on, and the whole message (with the client and
module it names) of every rejection by :func:`validate_updates` and :func:`screen_update`, and
the edges of their bounds (a count or norm exactly at its bound, a zero score or index)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import MODULES, random_factors
from fedlora.errors import UpdateError
from fedlora.lora import (
    ClientUpdate,
    Expected,
    LoRAFactors,
    dense_delta,
    screen_update,
    validate_updates,
)

META = torch.device("meta")  # a second device that every CPU-only machine has


def factors(rank: int = 2, seed: int = 0) -> dict[str, LoRAFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {n: random_factors(o, i, rank, gen) for n, (o, i) in MODULES.items()}


def expected(**options: Any) -> Expected:
    return Expected(shapes=MODULES, rank=4, **options)


# --- dense_delta and ClientUpdate.indices: where the result lives --------------------------------


def test_dense_delta_of_factors_is_computed_on_the_requested_device() -> None:
    f = LoRAFactors(A=torch.ones(2, 3), B=torch.ones(4, 2))

    assert dense_delta(f, META).device == META
    assert dense_delta(f, META).shape == (4, 3)


class MatmulDevices(TorchFunctionMode):
    """Records the devices of the operands of every matrix product computed under it."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[list[torch.device]] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
            self.products.append([a.device for a in args if isinstance(a, torch.Tensor)])
        return func(*args, **(kwargs or {}))


def test_dense_delta_moves_both_factors_before_the_product() -> None:
    # "factors are moved, not the product": the one product has both operands on the device
    f = LoRAFactors(A=torch.ones(2, 3), B=torch.ones(4, 2))
    with MatmulDevices() as log:
        dense_delta(f, META)

    assert log.products == [[META, META]]


def test_dense_delta_of_factors_without_device_is_their_product_where_they_are() -> None:
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    B = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    out = dense_delta(LoRAFactors(A=A, B=B))

    assert out.device == torch.device("cpu")
    assert out.tolist() == [[1.0, 2.0, 0.0], [2.0, 7.0, -3.0]]


def test_dense_delta_of_a_dense_matrix_is_moved_only_when_a_device_is_given() -> None:
    dense = torch.arange(6.0).reshape(2, 3)

    assert dense_delta(dense) is dense
    moved = dense_delta(dense, META)
    assert moved.device == META
    assert moved.shape == (2, 3)


def test_default_component_index_lives_on_the_factors_device() -> None:
    f = LoRAFactors(A=torch.empty(3, 5, device=META), B=torch.empty(4, 3, device=META))
    index = ClientUpdate("c0", {"q_proj": f}, 1).indices("q_proj")

    assert index.device == META
    assert index.dtype == torch.long
    assert index.shape == (3,)


# --- validate_updates: whole messages, the client and module named ------------------------------


def test_an_empty_round_is_rejected_with_its_reason() -> None:
    with pytest.raises(UpdateError) as err:
        validate_updates([])

    assert str(err.value) == "no client updates to aggregate (the client list is empty)"
    assert (err.value.client, err.value.module) == (None, None)


def test_an_update_without_modules_names_its_client() -> None:
    with pytest.raises(UpdateError) as err:
        validate_updates([ClientUpdate("c7", {}, 3)])

    assert str(err.value) == "client 'c7': the update holds no LoRA modules"
    assert (err.value.client, err.value.module) == ("c7", None)


def test_a_repeated_client_id_is_rejected_naming_it() -> None:
    with pytest.raises(UpdateError) as err:
        validate_updates([ClientUpdate("c0", factors(), 3), ClientUpdate("c0", factors(), 4)])

    assert str(err.value) == "client 'c0': the same client id appears twice in one round"
    assert err.value.client == "c0"


def test_differing_module_keys_name_the_first_client_as_reference() -> None:
    missing = {"q_proj": factors()["q_proj"]}
    updates = [ClientUpdate("alice", factors(), 3), ClientUpdate("bob", missing, 4)]

    with pytest.raises(UpdateError) as err:
        validate_updates(updates)

    assert str(err.value) == (
        "client 'bob': module keys differ from client 'alice': missing ['v_proj'], unexpected []"
    )
    assert (err.value.client, err.value.module) == ("bob", None)


@pytest.mark.parametrize(("count", "kind"), [(1.5, "float"), ("12", "str"), (None, "NoneType")])
def test_a_non_integer_example_count_is_named_by_its_type(count: object, kind: str) -> None:
    update = ClientUpdate("c3", factors(), cast(Any, count))

    with pytest.raises(UpdateError) as err:
        validate_updates([update])

    assert str(err.value) == f"client 'c3': num_examples must be an int, got {kind}"
    assert err.value.client == "c3"


def test_importance_for_an_unknown_module_names_client_and_module() -> None:
    update = ClientUpdate("c1", factors(), 3, importance={"k_proj": torch.ones(2)})

    with pytest.raises(UpdateError) as err:
        validate_updates([update])

    assert str(err.value) == (
        "client 'c1', module 'k_proj': importance for a module without factors"
    )
    assert (err.value.client, err.value.module) == ("c1", "k_proj")


def test_negative_importance_is_rejected_with_its_reason() -> None:
    update = ClientUpdate("c1", factors(), 3, importance={"v_proj": torch.tensor([1.0, -0.5])})

    with pytest.raises(UpdateError) as err:
        validate_updates([update])

    assert str(err.value) == (
        "client 'c1', module 'v_proj': importance must be finite and non-negative"
    )
    assert (err.value.client, err.value.module) == ("c1", "v_proj")


def test_a_zero_importance_score_is_accepted() -> None:
    # non-negative, not positive: a component that never mattered scores exactly 0
    scores = {"q_proj": torch.tensor([0.0, 2.0]), "v_proj": torch.zeros(2)}

    validate_updates([ClientUpdate("c1", factors(), 3, importance=scores)])


@pytest.mark.parametrize(("label", "bad"), [("A", 2), ("B", 3)])
def test_non_finite_values_are_counted_per_factor(label: str, bad: int) -> None:
    good = factors()
    f = good["v_proj"]
    t = (f.A if label == "A" else f.B).clone()
    t.view(-1)[:bad] = torch.tensor([float("nan"), float("inf"), -float("inf")][:bad])
    broken = LoRAFactors(A=t, B=f.B) if label == "A" else LoRAFactors(A=f.A, B=t)
    update = ClientUpdate("c2", {**good, "v_proj": broken}, 3)

    with pytest.raises(UpdateError) as err:
        validate_updates([update])

    assert (
        str(err.value) == f"client 'c2', module 'v_proj': factor {label} has {bad} NaN/Inf values"
    )
    assert (err.value.client, err.value.module) == ("c2", "v_proj")

    with pytest.raises(UpdateError) as screened:  # the server's screening names them too
        screen_update(update, expected())
    assert str(screened.value) == str(err.value)
    assert (screened.value.client, screened.value.module) == ("c2", "v_proj")


def test_a_rank_zero_module_is_rejected_naming_client_and_module() -> None:
    d_out, d_in = MODULES["q_proj"]
    empty = LoRAFactors(A=torch.zeros(0, d_in), B=torch.zeros(d_out, 0))
    update = ClientUpdate("c4", {**factors(), "q_proj": empty}, 3)

    with pytest.raises(UpdateError) as err:
        validate_updates([update])

    assert str(err.value) == (
        "client 'c4', module 'q_proj': rank 0: a LoRA module needs at least one component"
    )
    assert (err.value.client, err.value.module) == ("c4", "q_proj")


def test_a_dtype_differing_from_the_first_module_names_the_client() -> None:
    doubled = {n: f.to(torch.float64) for n, f in factors().items()}
    updates = [ClientUpdate("c0", factors(), 3), ClientUpdate("c5", doubled, 3)]

    with pytest.raises(UpdateError) as err:
        validate_updates(updates)

    assert str(err.value) == (
        "client 'c5': dtype torch.float64, expected torch.float32 as for other modules"
    )
    assert (err.value.client, err.value.module) == ("c5", None)


def test_a_component_index_that_includes_zero_is_accepted() -> None:
    index = {"q_proj": torch.tensor([0, 3]), "v_proj": torch.tensor([1, 0])}

    validate_updates([ClientUpdate("c0", factors(), 3, component_index=index)])


# --- screen_update: the server's bounds, at and past them ---------------------------------------


def test_screening_without_an_example_bound_accepts_any_count() -> None:
    screen_update(ClientUpdate("c0", factors(), 10**9), expected())


def test_an_example_count_at_the_bound_is_accepted_and_past_it_rejected() -> None:
    screen_update(ClientUpdate("c0", factors(), 50), expected(max_examples=50))

    with pytest.raises(UpdateError) as err:
        screen_update(ClientUpdate("c0", factors(), 51), expected(max_examples=50))

    assert str(err.value) == "client 'c0': num_examples = 51 is more than the 50 allowed"
    assert (err.value.client, err.value.module) == ("c0", None)


def test_screening_names_the_model_as_the_reference_for_module_keys() -> None:
    extra = {**factors(), "k_proj": factors()["q_proj"]}

    with pytest.raises(UpdateError) as err:
        screen_update(ClientUpdate("c1", extra, 3), expected())

    assert str(err.value) == (
        "client 'c1': module keys differ from the model's: missing [], unexpected ['k_proj']"
    )
    assert (err.value.client, err.value.module) == ("c1", None)


def test_screening_a_wrong_shape_names_client_module_and_both_shapes() -> None:
    good = factors()
    wide = LoRAFactors(A=torch.zeros(2, 11), B=good["v_proj"].B)

    with pytest.raises(UpdateError) as err:
        screen_update(ClientUpdate("c2", {**good, "v_proj": wide}, 3), expected())

    assert str(err.value) == (
        "client 'c2', module 'v_proj': weight shape (d_out, d_in) = (6, 11), expected (6, 10)"
    )
    assert (err.value.client, err.value.module) == ("c2", "v_proj")


@pytest.mark.parametrize("rank", [0, 5])
def test_screening_a_rank_out_of_range_names_client_and_module(rank: int) -> None:
    d_out, d_in = MODULES["q_proj"]
    bad = LoRAFactors(A=torch.ones(rank, d_in), B=torch.ones(d_out, rank))

    with pytest.raises(UpdateError) as err:
        screen_update(ClientUpdate("c3", {**factors(), "q_proj": bad}, 3), expected())

    assert str(err.value) == (
        f"client 'c3', module 'q_proj': rank {rank}, expected 1 … 4 (the rank it was asked to "
        "train)"
    )
    assert (err.value.client, err.value.module) == ("c3", "q_proj")


def test_screening_a_wrong_dtype_names_both_dtypes() -> None:
    doubled = {n: f.to(torch.float64) for n, f in factors().items()}

    with pytest.raises(UpdateError) as err:
        screen_update(ClientUpdate("c4", doubled, 3), expected())

    assert str(err.value) == (
        "client 'c4', module 'q_proj': dtype torch.float64, expected torch.float32"
    )
    assert (err.value.client, err.value.module) == ("c4", "q_proj")


def norm_five() -> dict[str, LoRAFactors]:
    """Factors whose every module has ``‖B A‖_F = 5`` exactly (a 3-4-5 column, a unit row)."""
    out = {}
    for name, (d_out, d_in) in MODULES.items():
        A, B = torch.zeros(1, d_in), torch.zeros(d_out, 1)
        A[0, 0], B[0, 0], B[1, 0] = 1.0, 3.0, 4.0
        out[name] = LoRAFactors(A=A, B=B)
    return out


def test_a_norm_at_the_bound_is_accepted_and_past_it_rejected() -> None:
    screen_update(ClientUpdate("c5", norm_five(), 3), expected(max_norm=5.0))

    with pytest.raises(UpdateError) as err:
        screen_update(ClientUpdate("c5", norm_five(), 3), expected(max_norm=4.5))

    assert str(err.value) == (
        "client 'c5', module 'q_proj': ‖B A‖_F = 5 exceeds the bound validation.max_norm = 4.5"
    )
    assert (err.value.client, err.value.module) == ("c5", "q_proj")

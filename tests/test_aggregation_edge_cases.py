"""Behaviours of the aggregation core that the mutation run showed were unchecked.

Each test pins one behaviour of ``linalg``, ``weighting``, ``importance`` or the strategies that a
surviving mutant changed: exact error messages, the dtype and device results are computed in, the
boundaries of ``compact`` / ``factored_svd`` / ``energy_rank``, and the handling of positions no
client holds. Expected values are computed by hand with torch, never by the code under test.
"""

from __future__ import annotations

import pytest
import torch

from conftest import MODULES, make_updates, random_factors
from fedlora.errors import ConfigError, UpdateError
from fedlora.importance import ComponentImportance, SmoothedSensitivity
from fedlora.linalg import compact, componentwise_mean, factored_svd, indexed_mean, stack
from fedlora.lora import LoRAFactors
from fedlora.methods import get_strategy
from fedlora.methods.florist import energy_rank
from fedlora.methods.hafl import aggregate_importance
from fedlora.strategies import GlobalState
from fedlora.strategies.base import (
    REGISTRY,
    RoundInput,
    Strategy,
    Traits,
    module_rank,
    register,
    shared_init,
)
from fedlora.weighting import client_weights

# --- weighting ---


def test_empty_client_list_error_message() -> None:
    with pytest.raises(UpdateError) as err:
        client_weights([])

    assert str(err.value) == "no client updates to weight (the client list is empty)"


def test_unknown_weighting_error_message() -> None:
    with pytest.raises(UpdateError) as err:
        client_weights(make_updates([1]), "size")  # type: ignore[arg-type]

    assert str(err.value) == (
        "unknown weighting 'size'; expected one of ['examples', 'uniform'] "
        "or a mapping client id -> weight"
    )


# --- linalg: stack, compact ---


def test_stack_of_bfloat16_factors_works_in_float32() -> None:
    gen = torch.Generator().manual_seed(3)
    fs = [random_factors(5, 4, r, gen) for r in (1, 2)]
    half = [LoRAFactors(A=f.A.bfloat16(), B=f.B.bfloat16()) for f in fs]

    s = stack(half, [0.25, 0.75])

    assert s.A.dtype == torch.float32 and s.B.dtype == torch.float32
    expected_A = torch.cat([half[0].A.float() * 0.25, half[1].A.float() * 0.75], dim=0)
    expected_B = torch.cat([half[0].B.float(), half[1].B.float()], dim=1)
    assert torch.equal(s.A, expected_A) and torch.equal(s.B, expected_B)


def test_stack_refuses_a_weight_count_that_does_not_match() -> None:
    gen = torch.Generator().manual_seed(4)
    fs = [random_factors(5, 4, 2, gen) for _ in range(3)]

    with pytest.raises(ValueError, match="shorter"):
        stack(fs, [0.5, 0.5])


def test_compact_goes_dense_when_factors_are_no_smaller() -> None:
    gen = torch.Generator().manual_seed(5)
    at_break_even = random_factors(4, 4, 2, gen)  # 2 * (4 + 4) == 4 * 4
    smaller = random_factors(4, 4, 1, gen)  # 1 * 8 < 16

    dense = compact(at_break_even)

    assert isinstance(dense, torch.Tensor)
    assert torch.equal(dense, at_break_even.B @ at_break_even.A)
    assert compact(smaller) is smaller


# --- linalg: indexed_mean, componentwise_mean ---


def test_indexed_mean_over_all_divides_by_the_weight_sum() -> None:
    v1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v2 = torch.tensor([[10.0, 20.0], [30.0, 40.0]])

    got = indexed_mean(
        [v1, v2], [torch.tensor([0, 1]), torch.tensor([1, 2])], [1.0, 3.0], 3, 0, over="all"
    )

    expected = torch.tensor([[1.0, 2.0], [3.0 + 30.0, 4.0 + 60.0], [90.0, 120.0]]) / 4.0
    assert torch.allclose(got, expected)


def test_indexed_mean_over_present_leaves_unheld_positions_zero_without_previous() -> None:
    v1 = torch.tensor([[1.0], [2.0]])
    v2 = torch.tensor([[4.0], [8.0]])

    got = indexed_mean(
        [v1, v2], [torch.tensor([0, 1]), torch.tensor([1, 2])], [0.25, 0.75], 4, 0, over="present"
    )

    expected = torch.tensor([[1.0], [0.25 * 2.0 + 0.75 * 4.0], [8.0], [0.0]])
    assert torch.equal(got, expected)


def test_indexed_mean_of_bfloat16_values_is_float32() -> None:
    v = torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.bfloat16)

    got = indexed_mean([v], [torch.tensor([1, 0])], [1.0], 2, 0, over="all")

    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor([[0.25, 3.0], [1.5, -2.0]]))


@pytest.mark.parametrize("over", ["all", "present"])
def test_indexed_mean_places_its_result_on_the_values_device(over: str) -> None:
    # The meta device stands in for an accelerator: the indices arrive on the CPU.
    values = [torch.empty(2, 3, device="meta"), torch.empty(1, 3, device="meta")]
    indices = [torch.tensor([0, 2]), torch.tensor([1])]

    if over == "all":
        got = indexed_mean(values, indices, [0.5, 0.5], 3, 0, over="all")
    else:  # every position is held, so nothing reads a meta value back
        got = indexed_mean(values, indices, [0.5, 0.5], 3, 0, over="present")

    assert got.device.type == "meta" and got.shape == (3, 3) and got.dtype == torch.float32


def test_indexed_mean_refuses_a_weight_count_that_does_not_match() -> None:
    values = [torch.ones(1, 2), torch.ones(1, 2)]

    with pytest.raises(ValueError, match="shorter"):
        indexed_mean(values, [torch.tensor([0]), torch.tensor([1])], [1.0], 2, 0, over="all")


def test_componentwise_mean_keeps_previous_a_and_b_of_unheld_components() -> None:
    gen = torch.Generator().manual_seed(6)
    client = random_factors(5, 4, 2, gen)
    previous = random_factors(5, 4, 3, gen)

    got = componentwise_mean(
        [client], [torch.tensor([0, 1])], [1.0], 3, over="present", previous=previous
    )

    assert torch.equal(got.A, torch.cat([client.A, previous.A[2:]], dim=0))
    assert torch.equal(got.B, torch.cat([client.B, previous.B[:, 2:]], dim=1))


# --- linalg: factored_svd ---


def test_factored_svd_at_full_rank_is_the_dense_svd() -> None:
    # rank == min(d_out, d_in): the dense route, bit for bit
    f = random_factors(5, 7, 5, torch.Generator().manual_seed(7))

    U, S, Vh = factored_svd(f)

    dense_U, dense_S, dense_Vh = torch.linalg.svd(f.B @ f.A, full_matrices=False)
    assert torch.equal(S, dense_S) and torch.equal(U, dense_U) and torch.equal(Vh, dense_Vh)


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(4, 6, 5), (9, 8, 2)])
def test_factored_svd_of_bfloat16_factors_is_float32(d_out: int, d_in: int, rank: int) -> None:
    f = random_factors(d_out, d_in, rank, torch.Generator().manual_seed(8))
    half = LoRAFactors(A=f.A.bfloat16(), B=f.B.bfloat16())

    U, S, Vh = factored_svd(half)

    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    dense = half.B.double() @ half.A.double()
    dense_S = torch.linalg.svdvals(dense)[: S.numel()]
    assert torch.allclose(S.double(), dense_S, rtol=1e-5, atol=1e-6 * float(dense_S[0]))
    assert torch.allclose(((U * S) @ Vh).double(), dense, atol=1e-5 * float(dense_S[0]))


# --- importance ---


def test_score_without_both_averages_raises() -> None:
    tracker = SmoothedSensitivity(sensitivity=torch.ones(2))  # no uncertainty yet

    with pytest.raises(RuntimeError) as err:
        tracker.score()

    assert str(err.value) == "no gradient seen yet: call update() after a backward pass"


def test_update_without_both_averages_starts_both_from_zero() -> None:
    tracker = SmoothedSensitivity(beta1=0.5, beta2=0.5, sensitivity=torch.full((1, 2), 9.0))

    tracker.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]))  # I = [0.5, 2]

    assert tracker.sensitivity is not None and tracker.uncertainty is not None
    assert tracker.sensitivity.tolist() == [[0.25, 1.0]]
    assert tracker.uncertainty.tolist() == [[0.125, 0.5]]


def test_component_importance_uses_both_betas_for_a_and_b() -> None:
    A = torch.tensor([[1.0, -2.0], [0.5, 4.0]], requires_grad=True)  # r = 2, d_in = 2
    B = torch.tensor([[2.0, 1.0], [-1.0, 3.0], [0.5, 0.5]], requires_grad=True)  # d_out = 3
    A.grad = torch.tensor([[0.5, 1.0], [2.0, -0.25]])
    B.grad = torch.tensor([[1.0, -1.0], [0.5, 2.0], [4.0, 1.0]])
    b1, b2 = 0.5, 0.75
    tracker = ComponentImportance({"m": lambda: (A, B)}, beta1=b1, beta2=b2)

    tracker.step()

    # one step from zero: Ī = (1−β1) I, Ū = (1−β2) |I − Ī| = (1−β2) β1 I, S = Ī Ū
    def score(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        current = (p.detach() * g).abs()
        return (1 - b1) * current * (1 - b2) * b1 * current

    expected = score(A, A.grad).mean(dim=1) + score(B, B.grad).mean(dim=0)
    assert torch.allclose(tracker.scores()["m"], expected)


def test_component_importance_treats_a_factor_without_grad_as_zero_gradient() -> None:
    A = torch.tensor([[1.0, -2.0], [0.5, 4.0]], requires_grad=True)
    B = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])  # frozen: no .grad
    A.grad = torch.tensor([[0.5, 1.0], [2.0, -0.25]])
    tracker = ComponentImportance({"m": lambda: (A, B)}, beta1=0.5, beta2=0.5)

    tracker.step()

    current = (A.detach() * A.grad).abs()
    expected = (0.5 * current * 0.25 * current).mean(dim=1)
    assert torch.allclose(tracker.scores()["m"], expected)


# --- strategies: base ---


def test_global_delta_of_an_unknown_module_names_it() -> None:
    with pytest.raises(KeyError) as err:
        GlobalState().global_delta("q_proj")

    assert err.value.args == ("q_proj",)


def test_equal_rank_strategy_names_itself_in_the_rank_error() -> None:
    strategy = get_strategy("fedit")
    state = strategy.init_state(MODULES, 3, torch.Generator().manual_seed(0))

    with pytest.raises(UpdateError) as err:
        strategy.aggregate(state, make_updates([2, 3]))

    assert str(err.value) == (
        "client 'c1', module 'q_proj': rank 3 differs from client 'c0''s rank 2; 'fedit' needs "
        "every client at the same rank (use flora, flexlora, zeropad, hetlora, hafl or ffa for "
        "mixed ranks)"
    )


def test_no_start_without_a_global_adapter_or_for_fresh_adapters() -> None:
    fedit = get_strategy("fedit")
    flora = get_strategy("flora")
    shared = GlobalState(factors=shared_init(MODULES, 4, torch.Generator().manual_seed(0)))

    assert fedit.redistribute(GlobalState(), [2]) == [None]
    assert flora.redistribute(shared, [2]) == [None]


def test_shared_init_draws_a_uniformly_within_one_over_sqrt_d_in() -> None:
    shapes = {"v_proj": (6, 16), "q_proj": (12, 25)}

    got = shared_init(shapes, 3, torch.Generator().manual_seed(11))

    gen = torch.Generator().manual_seed(11)
    for name, d_in in (("q_proj", 25), ("v_proj", 16)):  # drawn in sorted order
        u = torch.rand(3, d_in, generator=gen)
        expected = (2 * u - 1) / d_in**0.5
        assert torch.allclose(got[name].A, expected)
        assert torch.equal(got[name].B, torch.zeros(shapes[name][0], 3))


def test_module_rank_missing_module_error_message() -> None:
    with pytest.raises(ConfigError) as err:
        module_rank({"v_proj": 2, "k_proj": 1}, "q_proj")

    assert (
        str(err.value) == "no rank given for module 'q_proj'; ranks given for ['k_proj', 'v_proj']"
    )


@pytest.mark.parametrize("rank", [0, -1, True, 2.5, "3"])
def test_module_rank_refuses_a_bad_rank(rank: object) -> None:
    with pytest.raises(ConfigError) as err:
        module_rank(rank, "q_proj")  # type: ignore[arg-type]

    assert str(err.value) == f"rank for module 'q_proj' must be an int >= 1, got {rank!r}"


def test_register_makes_a_strategy_selectable_by_name() -> None:
    class Probe(Strategy):
        name = "probe-for-register-test"
        traits = Traits(paper="none", mixed_ranks=True)

        def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
            return rnd.factors(module)[0]

    try:
        assert register(Probe) is Probe
        assert REGISTRY["probe-for-register-test"] is Probe
        assert type(get_strategy("probe-for-register-test")) is Probe
        with pytest.raises(ValueError) as err:
            register(Probe)
        assert str(err.value) == "strategy name 'probe-for-register-test' registered twice"
    finally:
        REGISTRY.pop("probe-for-register-test", None)


# --- strategies: hafl, florist ---


def test_aggregate_importance_refuses_weights_that_do_not_match_the_updates() -> None:
    rnd = RoundInput(GlobalState(), make_updates([2, 2]), [1.0])

    with pytest.raises(ValueError, match="shorter"):
        aggregate_importance(rnd, "q_proj", 2)


def test_energy_rank_with_total_energy_one() -> None:
    # σ² = 0.25 each, Σ σ² = 1 exactly: 0.25, 0.5, 0.75 → the third reaches τ = 0.6
    assert energy_rank(torch.full((4,), 0.5), 0.6) == 3
    assert energy_rank(torch.full((4,), 0.5), 1.0) == 4

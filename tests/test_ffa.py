"""FFA-LoRA: a shared frozen A_0; averaging B is exact, for mixed ranks too."""

from __future__ import annotations

import pytest
import torch

from conftest import MODULES, exact_delta, make_updates, rel_err, setup_round
from fedlora.errors import UpdateError
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.strategies import GlobalState
from fedlora.weighting import client_weights


def test_shared_init_is_seeded_and_shaped() -> None:
    strategy = get_strategy("ffa")

    a = strategy.init_state(MODULES, 8, torch.Generator().manual_seed(1))
    b = strategy.init_state(MODULES, 8, torch.Generator().manual_seed(1))
    c = strategy.init_state(MODULES, 8, torch.Generator().manual_seed(2))

    for m, (_d_out, d_in) in MODULES.items():
        assert a.factors[m].A.shape == (8, d_in) and torch.equal(a.factors[m].A, b.factors[m].A)
        assert not torch.equal(a.factors[m].A, c.factors[m].A)
        assert float(a.factors[m].A.abs().max()) <= 1 / d_in**0.5
        assert torch.count_nonzero(a.factors[m].B) == 0


def test_averaging_b_is_exact_and_clients_restart_from_a0() -> None:
    strategy, state, updates = setup_round("ffa", [8, 4, 2])

    new = strategy.aggregate(state, updates)
    starts = strategy.redistribute(new, [8, 4, 2])

    for m in MODULES:
        assert torch.equal(new.factors[m].A, state.factors[m].A)
        assert rel_err(new.global_delta(m), exact_delta(updates, client_weights(updates), m)) < 1e-5
    assert starts[2] is not None and torch.equal(
        starts[2]["q_proj"].A, state.factors["q_proj"].A[:2]
    )


def test_an_update_that_moved_a_is_rejected() -> None:
    strategy, state, updates = setup_round("ffa", [4, 4])
    f = updates[1].factors["v_proj"]
    moved = LoRAFactors(A=f.A + 1e-3, B=f.B)
    updates[1] = ClientUpdate("c1", {**updates[1].factors, "v_proj": moved}, 3)

    with pytest.raises(UpdateError) as err:
        strategy.aggregate(state, updates)

    assert (err.value.client, err.value.module) == ("c1", "v_proj")
    assert str(err.value) == (
        "client 'c1', module 'v_proj': A differs from the shared A_0; FFA-LoRA needs A frozen "
        "(train B only)"
    )


def test_without_a_shared_init_the_error_says_what_to_do() -> None:
    updates = make_updates([4])

    with pytest.raises(UpdateError, match="init_state"):
        get_strategy("ffa").aggregate(GlobalState(), updates)


def test_rank_above_the_shared_init_is_rejected() -> None:
    strategy = get_strategy("ffa")
    state = strategy.init_state(MODULES, 2, torch.Generator().manual_seed(0))

    with pytest.raises(UpdateError, match="do not fit the shared A_0"):
        strategy.aggregate(state, make_updates([4]))


def test_every_rejection_names_the_client_and_the_module() -> None:
    strategy = get_strategy("ffa")
    small = strategy.init_state(MODULES, 2, torch.Generator().manual_seed(0))
    for state, updates, message in [
        (GlobalState(), make_updates([4]), "no shared A_0 for this module; build the state"),
        (
            small,
            make_updates([4]),
            r"rank 4 and shape \(12, 10\) do not fit the shared A_0 of rank 2",
        ),
    ]:
        with pytest.raises(UpdateError, match=message) as err:
            strategy.aggregate(state, updates)
        assert err.value.client == "c0" and err.value.module == "q_proj"
        assert str(err.value).startswith("client 'c0', module 'q_proj': " + message[:8])


@pytest.mark.parametrize(("ulps", "accepted"), [(6, True), (20, False)])
def test_an_a_is_a0_to_within_its_rounding_and_no_further(ulps: int, accepted: bool) -> None:
    # the tolerance is 4 eps (|A_0| + max |A_0|), 8 eps at the largest element: an A that went
    # through other kernels (6 eps off there) is still A_0, one moved by 20 eps is not
    strategy, state, updates = setup_round("ffa", [4])
    f = updates[0].factors["v_proj"]
    A = f.A.clone()
    i = int(A.abs().argmax())
    A.view(-1)[i] += ulps * torch.finfo(A.dtype).eps * float(A.abs().max())
    updates[0] = ClientUpdate("c0", {**updates[0].factors, "v_proj": LoRAFactors(A, f.B)}, 3)

    if accepted:
        new = strategy.aggregate(state, updates)
        assert torch.equal(new.factors["v_proj"].A, state.factors["v_proj"].A)
    else:
        with pytest.raises(UpdateError, match="A differs from the shared A_0"):
            strategy.aggregate(state, updates)


def test_float64_updates_give_a_float64_global_adapter() -> None:
    strategy, state, updates = setup_round("ffa", [4, 2])
    doubled = [
        ClientUpdate(u.client_id, {n: f.to(torch.float64) for n, f in u.factors.items()}, 5)
        for u in updates
    ]

    new = strategy.aggregate(state, doubled)

    assert all(f.A.dtype == f.B.dtype == torch.float64 for f in new.factors.values())

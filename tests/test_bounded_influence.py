"""Bounded client influence: a client is weighed by the example count it joined with, capped
relative to the median; an update far above the round's median norm is rejected by name; an
error found during aggregation drops its client, not the round; a non-finite aggregate is never
applied."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from conftest import MODULES
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.lora import LoRAFactors, update_norm
from fedlora.rounds import Client, Failure, FederatedRounds, LocalResult, Task
from fedlora.strategies import GlobalState
from test_validation import TINY, results_for, server


def with_examples(counts: dict[int, int], seed: int = 0) -> Any:
    """An engine whose client ``k`` reports ``counts[k]`` examples (the others their own)."""

    def execute(tasks: list[Task]) -> list[LocalResult | Failure]:
        results = results_for(tasks, seed)
        return [
            dataclasses.replace(r, num_examples=counts[k])
            if k in counts and isinstance(r, LocalResult)
            else r
            for k, r in enumerate(results)
        ]

    return execute


def assert_same_state(a: GlobalState, b: GlobalState) -> None:
    assert a.factors.keys() == b.factors.keys()
    for n in a.factors:
        assert torch.equal(a.factors[n].A, b.factors[n].A)
        assert torch.equal(a.factors[n].B, b.factors[n].B)


def test_a_client_is_weighed_by_the_count_it_joined_with_not_what_it_claims_later() -> None:
    attacked, honest = server("flexlora"), server("flexlora")
    attacked.run_round(1, with_examples({}))
    honest.run_round(1, with_examples({}))

    record = attacked.flagging(attacked.run_round(2, with_examples({0: 9_999}, seed=1)))
    honest.run_round(2, with_examples({}, seed=1))  # inflated above, within max_examples

    assert record.to_json()["flagged"] == {
        "client-0000": "reported 9999 examples; weighed by the 20 it joined with"
    }
    assert "client-0000" in record.clients and not record.failed
    assert attacked.examples == honest.examples == {"client-0000": 20, "client-0001": 21,
                                                    "client-0002": 22}  # fmt: skip
    assert_same_state(attacked.state, honest.state)


def test_a_first_report_far_above_the_median_is_capped() -> None:
    attacked, capped = server("flexlora"), server("flexlora")

    record = attacked.flagging(attacked.run_round(1, with_examples({0: 9_999})))
    capped.run_round(1, with_examples({0: 220}))  # 10 × the median of 9,999, 21 and 22

    assert attacked.weighed_examples("client-0000") == 220
    assert record.flagged == {
        "client-0000": "joined with 9999 examples; weighed by 220 (validation.weight_ratio)"
    }
    assert_same_state(attacked.state, capped.state)
    off = load_config(TINY, ["validation.weight_ratio=none"])
    uncapped = server("flexlora")
    uncapped.cfg = dataclasses.replace(
        uncapped.cfg, validation=dataclasses.replace(uncapped.cfg.validation, weight_ratio=None)
    )
    uncapped.run_round(1, with_examples({0: 9_999}))
    assert off.validation.weight_ratio is None
    assert uncapped.weighed_examples("client-0000") == 9_999


def scaled(victim: int, factor: float, seed: int = 0) -> Any:
    def execute(tasks: list[Task]) -> list[LocalResult | Failure]:
        results = results_for(tasks, seed)
        bad = results[victim]
        assert isinstance(bad, LocalResult)
        factors = {n: LoRAFactors(A=f.A, B=f.B * factor) for n, f in bad.factors.items()}
        results[victim] = dataclasses.replace(bad, factors=factors)
        return results

    return execute


def absent(victim: int, seed: int = 0) -> Any:
    def execute(tasks: list[Task]) -> list[LocalResult | Failure]:
        results = results_for(tasks, seed)
        results[victim] = Failure("absent")
        return results

    return execute


@pytest.mark.parametrize("strategy", ["flora", "flexlora", "hafl"])
def test_an_update_far_above_the_rounds_median_norm_is_rejected_by_name(strategy: str) -> None:
    attacked, reference = server(strategy), server(strategy)

    record = attacked.run_round(1, scaled(1, 50.0))  # within max_norm, 50 × its honest norm
    reference.run_round(1, absent(1))

    reason = record.failed["client-0001"]
    assert reason.startswith("rejected update: client 'client-0001', module ")
    assert "validation.norm_ratio = 10 times the round's median" in reason
    assert_same_state(attacked.state, reference.state)
    mild = server(strategy)
    assert not mild.run_round(1, scaled(1, 2.0)).failed  # twice the norm is honest enough
    ranks = server(strategy)  # ranks 4, 4, 2 (test_validation.RANKS): compared per component
    norms = [
        update_norm(f) / f.rank**0.5
        for r in results_for(ranks.tasks(1), 0)
        if isinstance(r, LocalResult)
        for f in r.factors.values()
    ]
    assert max(norms) / min(norms) < 10


def test_an_error_found_during_aggregation_drops_its_client_not_the_round() -> None:
    attacked, reference = server("ffa"), server("ffa")
    A0 = attacked.state.factors

    def frozen_a(moved: int | None) -> Any:
        def execute(tasks: list[Task]) -> list[LocalResult | Failure]:
            results = results_for(tasks, 0)
            out: list[LocalResult | Failure] = []
            for k, (task, r) in enumerate(zip(tasks, results, strict=True)):
                assert isinstance(r, LocalResult)
                rank = task.plan.rank
                factors = {
                    n: LoRAFactors(A=A0[n].A[:rank] + (0.5 if k == moved else 0.0), B=f.B)
                    for n, f in r.factors.items()
                }
                out.append(
                    Failure("absent")
                    if moved is None and k == 2
                    else dataclasses.replace(r, factors=factors)
                )
            return out

        return execute

    record = attacked.run_round(1, frozen_a(2))  # client 2 trained A, which FFA-LoRA refuses
    reference.run_round(1, frozen_a(None))

    reason = record.failed["client-0002"]
    assert reason.startswith("rejected in aggregation: client 'client-0002'")
    assert "A differs from the shared A_0" in reason and not record.skipped
    assert record.clients == ["client-0000", "client-0001"]
    assert_same_state(attacked.state, reference.state)


def test_a_non_finite_aggregate_is_never_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = server("flexlora")
    before = rounds.state
    aggregate = type(rounds.strategy).aggregate

    def overflowing(self: Any, state: GlobalState, updates: Any) -> GlobalState:
        new = aggregate(self, state, updates)
        name = sorted(new.factors)[0]
        f = new.factors[name]
        return dataclasses.replace(
            new, factors={**new.factors, name: LoRAFactors(A=f.A, B=f.B * float("inf"))}
        )

    monkeypatch.setattr(type(rounds.strategy), "aggregate", overflowing)
    record = rounds.run_round(1, with_examples({}))

    assert record.skipped is not None and "the aggregate's factors is not finite" in record.skipped
    assert rounds.state is before


@pytest.mark.parametrize("key", ["norm_ratio", "weight_ratio"])
def test_the_ratios_are_checked(key: str) -> None:
    with pytest.raises(ConfigError, match=f"validation.{key} must be >= 1"):
        load_config(TINY, [f"validation.{key}=0.5"])
    assert getattr(load_config(TINY).validation, key) == 10.0


def test_the_joined_counts_survive_a_checkpoint() -> None:
    rounds = server("flexlora")
    rounds.run_round(1, with_examples({0: 30}))
    tensors, meta = rounds.snapshot()

    again: FederatedRounds = server("flexlora")
    again.restore(tensors, meta)

    assert again.examples == rounds.examples and again.examples["client-0000"] == 30
    assert set(MODULES) == set(again.state.factors)


def test_a_client_may_shrink_its_rank_never_grow_it() -> None:
    rounds = server("hetlora")

    def growing(tasks: list[Task]) -> list[LocalResult | Failure]:
        results = results_for(tasks, 0)
        first = results[0]
        assert isinstance(first, LocalResult)
        results[0] = dataclasses.replace(first, next_rank=10**9)  # past the rank cap
        return results

    record = rounds.run_round(1, growing)

    assert "next_rank 1000000000 is outside 1 … 4" in record.failed["client-0000"]
    assert rounds.ranks["client-0000"] == 4


def test_a_partition_the_server_made_is_never_capped_however_skewed() -> None:
    from fedlora.data import Example

    cfg = server("flexlora").cfg
    sizes = [400, 20, 22]  # 400 is 18 times the median: a Dirichlet partition can be so skewed
    clients = [
        Client(f"client-{k:04d}", k, r, 2.0 * r, [Example(f"q{i}", "a") for i in range(n)])
        for k, (r, n) in enumerate(zip([4, 4, 2], sizes, strict=True))
    ]
    rounds = FederatedRounds(
        cfg,
        server("flexlora").strategy,
        clients,
        MODULES,
        1000,
        server("flexlora").party,
    )

    assert rounds.assigned == {c.cid for c in clients}
    assert [rounds.weighed_examples(c.cid) for c in clients] == sizes

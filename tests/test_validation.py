"""Update validation before aggregation: every malformed update is rejected with a reason naming
the client (and module), and never reaches the global state."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MODULES, examples, random_factors
from fedlora.config import load_config
from fedlora.devices import HOST
from fedlora.errors import UpdateError
from fedlora.lora import (
    ClientUpdate,
    Expected,
    LoRAFactors,
    dense_delta,
    screen_update,
    update_norm,
)
from fedlora.methods import get_strategy
from fedlora.rounds import ClientInfo, Failure, FederatedRounds, LocalResult, Task

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
RANKS = [4, 4, 2]

CORRUPTIONS = [
    "drop_module",
    "extra_module",
    "wrong_shape",
    "rank_too_big",
    "nan",
    "inf",
    "float64",
    "huge_norm",
    "zero_examples",
    "negative_examples",
    "bool_examples",
    "too_many_examples",
]
MODULE_LEVEL = {"wrong_shape", "rank_too_big", "nan", "inf", "float64", "huge_norm"}


def good_factors(rank: int, seed: int) -> dict[str, LoRAFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {n: random_factors(o, i, rank, gen, alpha=0.5) for n, (o, i) in MODULES.items()}


def corrupt(
    factors: dict[str, LoRAFactors], examples: int, kind: str, module: str, at: int
) -> tuple[dict[str, LoRAFactors], Any]:
    """``factors`` and an example count with one defect of ``kind`` in ``module``."""
    out = dict(factors)
    f = out[module]
    if kind == "drop_module":
        del out[module]
    elif kind == "extra_module":
        out["k_proj"] = f
    elif kind == "wrong_shape":
        out[module] = LoRAFactors(A=torch.zeros(f.rank, f.d_in + 1), B=f.B)
    elif kind == "rank_too_big":
        out[module] = LoRAFactors(A=torch.ones(9, f.d_in), B=torch.ones(f.d_out, 9))
    elif kind in ("nan", "inf"):
        B = f.B.clone()
        B.view(-1)[at % B.numel()] = float(kind)
        out[module] = LoRAFactors(A=f.A, B=B)
    elif kind == "float64":
        out[module] = f.to(torch.float64)
    elif kind == "huge_norm":
        out[module] = LoRAFactors(A=f.A, B=f.B * 1e6)
    elif kind == "zero_examples":
        examples = 0
    elif kind == "negative_examples":
        examples = -at - 1
    elif kind == "bool_examples":
        examples = True  # type: ignore[assignment]
    elif kind == "too_many_examples":
        examples = 10**9
    return out, examples


EXPECTED = Expected(MODULES, rank=4, max_norm=1e3, max_examples=10_000)


@settings(max_examples=examples(120), deadline=None)
@given(
    kind=st.sampled_from(CORRUPTIONS),
    module=st.sampled_from(sorted(MODULES)),
    at=st.integers(0, 10_000),
    rank=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_every_malformed_update_is_rejected_naming_client_and_module(
    kind: str, module: str, at: int, rank: int, seed: int
) -> None:
    factors, examples = corrupt(good_factors(rank, seed), 50, kind, module, at)
    screen_update(ClientUpdate("good", good_factors(rank, seed), 50), EXPECTED)  # the original

    with pytest.raises(UpdateError) as err:
        screen_update(ClientUpdate("mallory", factors, examples), EXPECTED)

    assert err.value.client == "mallory" and "'mallory'" in str(err.value)
    if kind in MODULE_LEVEL:
        assert err.value.module == module and repr(module) in str(err.value)


def test_the_norm_bound_is_computed_from_the_factors() -> None:
    f = good_factors(3, 0)["q_proj"]
    assert update_norm(f) == pytest.approx(float(torch.linalg.norm(f.delta())), rel=1e-5)


class NoModel:
    """The server's model, not needed to aggregate (nothing is due for evaluation)."""

    device = HOST  # where its peak memory would be measured (nowhere, on the host)

    def evaluate_with(self, factors: object) -> dict[str, float]:
        return {}

    def merge(self, deltas: object) -> None:
        pass


def server(strategy: str) -> FederatedRounds:
    cfg = load_config(TINY, [f"strategy={strategy}", "rounds=5", "eval.every=10"])
    limits = dataclasses.replace(cfg.validation, max_norm=1e3, max_examples=10_000)
    cfg = dataclasses.replace(cfg, validation=limits)
    clients = [ClientInfo(f"client-{k:04d}", k, r, 2.0 * r) for k, r in enumerate(RANKS)]
    return FederatedRounds(
        cfg,
        get_strategy(strategy),
        clients,
        MODULES,
        1000,
        NoModel(),  # type: ignore[arg-type]
    )


def results_for(tasks: list[Task], seed: int) -> list[LocalResult | Failure]:
    return [
        LocalResult(good_factors(task.plan.rank, seed + k), 1.0, None, {}, 20 + k)
        for k, task in enumerate(tasks)
    ]


@settings(max_examples=examples(40), deadline=None)
@given(
    strategy=st.sampled_from(["flora", "flexlora", "zeropad", "hafl"]),
    kind=st.sampled_from(CORRUPTIONS),
    victim=st.integers(0, 2),
    module=st.sampled_from(sorted(MODULES)),
    at=st.integers(0, 10_000),
    seed=st.integers(0, 2**16),
)
def test_a_malformed_update_never_reaches_the_global_state(
    strategy: str, kind: str, victim: int, module: str, at: int, seed: int
) -> None:
    def with_bad(tasks: list[Task]) -> list[LocalResult | Failure]:
        results = results_for(tasks, seed)
        good = results[victim]
        assert isinstance(good, LocalResult)
        factors, examples = corrupt(good.factors, good.num_examples, kind, module, at)
        results[victim] = dataclasses.replace(good, factors=factors, num_examples=examples)
        return results

    def without(tasks: list[Task]) -> list[LocalResult | Failure]:
        results = results_for(tasks, seed)
        results[victim] = Failure("absent")
        return results

    attacked, reference = server(strategy), server(strategy)
    record = attacked.run_round(1, with_bad)
    reference.run_round(1, without)

    cid = f"client-{victim:04d}"
    assert record.failed[cid].startswith("rejected update: client " + repr(cid))
    assert cid not in record.clients
    a, b = attacked.state, reference.state
    assert a.factors.keys() == b.factors.keys()
    assert all(torch.equal(a.factors[n].A, b.factors[n].A) for n in a.factors)
    assert all(torch.equal(a.factors[n].B, b.factors[n].B) for n in a.factors)
    assert a.base_delta.keys() == b.base_delta.keys()
    assert all(
        torch.equal(dense_delta(a.base_delta[n]), dense_delta(b.base_delta[n]))
        for n in a.base_delta
    )


def test_when_every_update_is_malformed_the_state_is_untouched() -> None:
    rounds = server("flexlora")
    before = rounds.state

    def all_bad(tasks: list[Task]) -> list[LocalResult | Failure]:
        return [
            dataclasses.replace(r, num_examples=0) if isinstance(r, LocalResult) else r
            for r in results_for(tasks, 0)
        ]

    record = rounds.run_round(1, all_bad)
    assert record.skipped and rounds.state is before and len(record.failed) == 3

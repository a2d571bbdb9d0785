"""Client faults: injected in the simulation, a round completes with the clients that delivered,
FLoRA stays exact over them, and too few replies retry, then skip, the round."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import exact_delta
from fedlora.config import RunConfig, load_config
from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate, dense_delta
from fedlora.methods.flora import FLoRA
from fedlora.rounds import ClientInfo, Failure, LocalPlan, PartyModel, Task
from fedlora.simulation import Runner, injected_fault
from fedlora.strategies import GlobalState
from fedlora.weighting import client_weights

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def tiny(**overrides: object) -> RunConfig:
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_injected_faults_follow_their_probabilities_and_repeat() -> None:
    cfg = tiny(**{"faults.crash_before": 0.1, "faults.timeout": 0.2, "faults.straggler": 0.3})
    tasks = [
        Task(ClientInfo(f"c{k}", k, 4, 8.0), t, LocalPlan(4), 0, [], 0, attempt)
        for k in range(50)
        for t in range(1, 21)
        for attempt in range(2)
    ]
    drawn = [injected_fault(cfg, task) for task in tasks]
    counts = Counter(drawn)
    n = len(tasks)
    assert counts["crash_before"] / n == pytest.approx(0.1, abs=0.02)
    assert counts["timeout"] / n == pytest.approx(0.2, abs=0.03)
    assert counts["straggler"] / n == pytest.approx(0.3, abs=0.03)
    assert counts[None] / n == pytest.approx(0.4, abs=0.03) and "crash_after" not in counts
    assert drawn == [injected_fault(cfg, task) for task in tasks]  # seeded, not global RNG
    assert drawn != [injected_fault(tiny(seed=1, **{"faults.crash_before": 0.1,
        "faults.timeout": 0.2, "faults.straggler": 0.3}), task) for task in tasks]  # fmt: skip


def test_thirty_percent_failures_complete_and_flora_is_exact_over_the_survivors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[ClientUpdate], GlobalState]] = []
    aggregate = FLoRA.aggregate

    def spy(self: FLoRA, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        new = aggregate(self, state, updates)
        seen.append((list(updates), new))
        return new

    monkeypatch.setattr(FLoRA, "aggregate", spy)
    faults = {"faults.crash_before": 0.1, "faults.crash_after": 0.1, "faults.timeout": 0.1}
    cfg = tiny(rounds=4, **faults, **{"clients.num_clients": 6, "clients.min_clients": 2})

    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    records = rows(tmp_path / "run")[1:]
    failed = {cid for r in records for cid in r.get("failed", {})}
    assert failed and summary["rounds"] == 4 and summary["improved"]
    assert len(seen) == sum(1 for r in records if "skipped" not in r)
    for record, (updates, state) in zip(
        [r for r in records if "skipped" not in r], seen, strict=True
    ):
        ids = [u.client_id for u in updates]
        assert sorted(ids) == sorted(record["clients"])  # only the survivors were aggregated
        assert not set(ids) & set(record.get("failed", {}))
        assert [t["client"] for t in record["traffic"]] == record["clients"]
        ordered = sorted(updates, key=lambda u: u.client_id)
        weights = client_weights(ordered, "examples")  # p_k renormalised over the survivors
        for name, delta in state.base_delta.items():
            expected = exact_delta(ordered, weights, name)
            torch.testing.assert_close(dense_delta(delta).double(), expected, rtol=1e-5, atol=1e-7)
    reasons = {reason for r in records for reason in r.get("failed", {}).values()}
    assert all(reason.startswith("injected fault") for reason in reasons)
    report = (tmp_path / "run" / "summary.md").read_text()
    assert "Clients that did not deliver:" in report and sorted(failed)[0] in report


def test_a_round_with_too_few_replies_is_retried_with_a_fresh_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    execute = Runner.execute

    def first_try_fails(self: Runner, tasks: list[Task]) -> list[Any]:
        if tasks[0].attempt == 0:
            return [Failure("simulated outage") for _ in tasks]
        return execute(self, tasks)

    monkeypatch.setattr(Runner, "execute", first_try_fails)
    cfg = tiny(rounds=2, **{"clients.num_clients": 4, "clients.fraction": 0.5})

    run_experiment(cfg, tmp_path / "run", progress=False)

    for record in rows(tmp_path / "run")[1:]:
        assert record["attempts"] == 2 and "skipped" not in record
        assert set(record["failed"].values()) == {"simulated outage"}
        assert len(record["clients"]) == 2


def test_a_round_without_enough_clients_in_any_try_is_skipped_and_changes_nothing(
    tmp_path: Path,
) -> None:
    cfg = tiny(strategy="flexlora", **{"faults.crash_before": 1.0, "clients.retries": 2})

    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    records = rows(tmp_path / "run")
    for record in records[1:]:
        assert record["attempts"] == 3 and "clients.min_clients = 1" in record["skipped"]
        assert record["clients"] == [] and record["eval_loss"] == records[0]["eval_loss"]
    assert summary["final"] == summary["base"] and not summary["improved"]
    assert (
        "skipped: fewer than clients.min_clients" in (tmp_path / "run" / "summary.md").read_text()
    )


def test_stragglers_deliver_partial_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    steps: list[int] = []
    train = PartyModel.train_together

    def spy(self: PartyModel, jobs: Any, t: int) -> Any:
        steps.extend((job.local or self.cfg.train).steps for job in jobs)
        return train(self, jobs, t)

    monkeypatch.setattr(PartyModel, "train_together", spy)
    cfg = tiny(rounds=1, **{"faults.straggler": 1.0, "faults.straggler_work": 0.34})
    run_experiment(cfg, tmp_path / "run", progress=False)
    assert steps == [1, 1, 1]  # 3 local steps × 0.34, at least one


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"faults.crash_before": 0.7, "faults.timeout": 0.5}, "sum to 1.2"),
        ({"faults.timeout": -0.1}, r"faults.timeout must be a probability"),
        ({"clients.min_clients": 4}, r"clients.min_clients must be in 1 … clients.num_clients"),
        ({"clients.fraction": 0.34, "clients.min_clients": 2}, "more than the 1 clients"),
        ({"flower.round_timeout_s": 0}, "must be > 0 seconds"),
    ],
)
def test_fault_settings_are_checked(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_a_client_that_times_out_trains_but_its_update_never_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every client times out in every try: the round trains three clients twice, then skips
    cfg = tiny(**{"faults.timeout": 1.0, "clients.retries": 1, "rounds": 1})
    trained: list[str] = []
    train = PartyModel.train_together

    def training(self: Any, jobs: Any, t: int) -> Any:
        trained.extend(job.client.cid for job in jobs)
        return train(self, jobs, t)

    monkeypatch.setattr(PartyModel, "train_together", training)
    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    last = rows(tmp_path / "run")[-1]
    assert len(trained) == 6 and last["attempts"] == 2
    assert set(last["failed"].values()) == {"injected fault: no reply before the round closed"}
    assert last["skipped"].startswith("fewer than clients.min_clients = 1")
    assert summary["final"] == summary["base"]  # nothing arrived, nothing changed

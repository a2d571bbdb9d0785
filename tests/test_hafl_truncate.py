"""HAFL truncation: clients receive their most important components; updates map back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.config import load_config
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.methods.hafl import HAFLTruncate
from fedlora.strategies import GlobalState

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def global_state(importance: list[float] | None) -> GlobalState:
    A = torch.arange(4.0)[:, None].repeat(1, 3)  # row i is all i
    B = torch.arange(4.0)[None, :].repeat(2, 1)  # column i is all i
    scores = {} if importance is None else {"m": torch.tensor(importance)}
    return GlobalState(factors={"m": LoRAFactors(A=A, B=B)}, importance=scores)


def test_a_client_receives_its_most_important_components() -> None:
    # Prepare: importance [1, 5, 3, 0] → the two most important are components 1 and 2
    strategy = get_strategy("hafl-truncate")
    state = global_state([1.0, 5.0, 3.0, 0.0])

    # Execute
    (start,) = strategy.redistribute(state, [2])
    index = strategy.component_indices(state, 2)

    # Assert
    assert start is not None and start["m"].A[:, 0].tolist() == [1.0, 2.0]
    assert start["m"].B[0].tolist() == [1.0, 2.0]
    assert index is not None and index["m"].tolist() == [1, 2]


def test_without_importance_the_first_components_are_used_and_extra_rank_extends() -> None:
    strategy = get_strategy("hafl-truncate")

    (start,) = strategy.redistribute(global_state(None), [2])
    wide = strategy.component_indices(global_state([1.0, 5.0, 3.0, 0.0]), 6)

    assert start is not None and start["m"].A[:, 0].tolist() == [0.0, 1.0]
    assert wide is not None and wide["m"].tolist() == [0, 1, 2, 3, 4, 5]
    assert strategy.component_indices(GlobalState(), 2) is None


def test_updates_are_mapped_back_to_their_component_indices() -> None:
    strategy = get_strategy("hafl-truncate")
    state = global_state([1.0, 5.0, 3.0, 0.0])
    index = strategy.component_indices(state, 2)
    trained = LoRAFactors(A=torch.full((2, 3), 9.0), B=torch.full((2, 2), 9.0))
    update = ClientUpdate(
        "a", {"m": trained}, 4, component_index=index, importance={"m": torch.tensor([7.0, 8.0])}
    )

    new = strategy.aggregate(state, [update])

    assert new.factors["m"].A[:, 0].tolist() == [0.0, 9.0, 9.0, 3.0]
    assert new.importance["m"].tolist() == [1.0, 7.0, 8.0, 0.0]


@pytest.mark.runner
def test_runner_sends_importance_and_indices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[ClientUpdate]] = []
    original = HAFLTruncate.aggregate

    def recording(
        self: HAFLTruncate, state: GlobalState, updates: list[ClientUpdate]
    ) -> GlobalState:
        seen.append(list(updates))
        return original(self, state, updates)

    monkeypatch.setattr(HAFLTruncate, "aggregate", recording)
    cfg = load_config(TINY, ["strategy=hafl-truncate", "rounds=2"])

    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and summary["improved"] and summary["adapter_ranks"] == [8]
    first, second = seen
    for u in first:  # round 1: no importance yet, so the first r_k of the shared init
        assert u.importance is not None and u.component_index is not None
        for name, f in u.factors.items():
            assert u.component_index[name].tolist() == list(range(f.rank))
    for u in second:  # round 2: indices chosen by the importance aggregated in round 1
        assert u.importance is not None and u.component_index is not None
        for name, f in u.factors.items():
            assert u.component_index[name].numel() == f.rank
            assert u.importance[name].shape == (f.rank,)


def test_per_module_ranks_give_each_module_its_own_components() -> None:
    """A rank per module (``{"m": 1, "n": 3}``): each module's start and indices use its own."""
    strategy = get_strategy("hafl-truncate")
    state = global_state([1.0, 5.0, 3.0, 0.0])
    state.factors["n"] = state.factors["m"]
    state.importance["n"] = torch.tensor([4.0, 0.0, 2.0, 9.0])
    spec = {"m": 1, "n": 3}

    (start,) = strategy.redistribute(state, [spec])
    index = strategy.component_indices(state, spec)

    assert index is not None and index["m"].tolist() == [1] and index["n"].tolist() == [0, 2, 3]
    assert start is not None and start["m"].A[:, 0].tolist() == [1.0]
    assert start["n"].A[:, 0].tolist() == [0.0, 2.0, 3.0]


def test_equal_importance_goes_to_the_lower_index() -> None:
    """Ties (here 40 components, every other one scored 1, the rest 0) keep the lower indices,
    whatever the sort's internals do with equal keys."""
    strategy = get_strategy("hafl-truncate")
    A, B = torch.randn(40, 3), torch.randn(2, 40)
    scores = torch.tensor([float(i % 2) for i in range(40)])
    state = GlobalState(factors={"m": LoRAFactors(A=A, B=B)}, importance={"m": scores})

    index = strategy.component_indices(state, 5)

    assert index is not None and index["m"].tolist() == [1, 3, 5, 7, 9]

"""HAFL freezing: every client holds all r_g components, trains and uploads only its top r_k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora import adapters
from fedlora.config import TrainConfig, load_config
from fedlora.data import Example, encode
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import get_strategy
from fedlora.methods.hafl import HAFLFreeze
from fedlora.models import build_tiny
from fedlora.strategies import GlobalState
from fedlora.train import train_local

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
TARGETS = ["q_proj", "v_proj"]
EXAMPLES = [Example(prompt=f"what is {i} plus {i}", response=f"it is {2 * i}") for i in range(12)]


def global_state(importance: list[float]) -> GlobalState:
    A = torch.arange(4.0)[:, None].repeat(1, 3)  # row i is all i
    B = torch.arange(4.0)[None, :].repeat(2, 1)  # column i is all i
    return GlobalState(
        factors={"m": LoRAFactors(A=A, B=B)}, importance={"m": torch.tensor(importance)}
    )


def test_a_client_trains_its_top_components_and_holds_the_rest_frozen() -> None:
    # Prepare: importance [1, 5, 3, 0] → rank 2 trains components 1 and 2, holds 0 and 3
    strategy = get_strategy("hafl-freeze")
    state = global_state([1.0, 5.0, 3.0, 0.0])

    # Execute
    (start,) = strategy.redistribute(state, [2])
    frozen = strategy.frozen_components(state, 2)
    index = strategy.component_indices(state, 2)

    # Assert
    assert start is not None and start["m"].A[:, 0].tolist() == [1.0, 2.0]
    assert frozen is not None and frozen["m"].A[:, 0].tolist() == [0.0, 3.0]
    assert frozen["m"].B[0].tolist() == [0.0, 3.0]
    assert index is not None and index["m"].tolist() == [1, 2]
    assert strategy.frozen_components(state, 4) is None  # a full-rank client freezes nothing
    assert strategy.frozen_components(GlobalState(), 2) is None


def test_per_module_ranks_freeze_each_modules_own_rest() -> None:
    """A rank per module: ``m`` at rank 1 holds all but its top component frozen, ``n`` at its
    full rank 4 freezes nothing (and is absent from the frozen set)."""
    strategy = get_strategy("hafl-freeze")
    state = global_state([1.0, 5.0, 3.0, 0.0])
    state.factors["n"] = state.factors["m"]
    state.importance["n"] = torch.tensor([4.0, 0.0, 2.0, 9.0])

    frozen = strategy.frozen_components(state, {"m": 1, "n": 4})

    assert frozen is not None and sorted(frozen) == ["m"]
    assert frozen["m"].A[:, 0].tolist() == [0.0, 2.0, 3.0]


def test_frozen_components_are_bit_identical_and_have_no_gradient() -> None:
    # Prepare: a rank-4 global adapter; the client trains components {1, 3}, holds {0, 2}
    model, tokenizer = build_tiny(seed=0)
    shapes = adapters.target_shapes(model, TARGETS)
    gen = torch.Generator().manual_seed(0)
    full = {
        n: LoRAFactors(A=0.1 * torch.randn(4, d_in, generator=gen), B=0.1 * torch.randn(d_out, 4))
        for n, (d_out, d_in) in shapes.items()
    }
    ids = torch.randint(0, 200, (2, 12), generator=gen)
    whole = adapters.attach_factors(model, TARGETS, full)
    reference = whole(input_ids=ids).logits.detach()
    model = adapters.detach(whole)
    train = {n: LoRAFactors(A=f.A[[1, 3]], B=f.B[:, [1, 3]]) for n, f in full.items()}
    frozen = {n: LoRAFactors(A=f.A[[0, 2]], B=f.B[:, [0, 2]]) for n, f in full.items()}
    peft_model = adapters.attach(model, TARGETS, 2, 4.0, seed=1)
    adapters.write_factors(peft_model, train)
    adapters.add_frozen(peft_model, frozen)

    # Execute: the forward pass holds all four; then train hard
    held = peft_model(input_ids=ids).logits.detach()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    data = encode(EXAMPLES, tokenizer, max_length=48)
    train_local(peft_model, data, TrainConfig(lr=1e-2, steps=3), tokenizer.pad_token_id, 0)
    after_frozen = adapters.read_factors(peft_model, adapters.FROZEN)
    after_trained = adapters.read_factors(peft_model)
    plain = adapters.detach(peft_model)

    # Assert
    assert (held - reference).abs().max() < 1e-5
    assert sum(p.numel() for p in trainable) == sum(2 * (o + i) for o, i in shapes.values())
    for n in shapes:
        assert torch.equal(after_frozen[n].A, frozen[n].A)
        assert torch.equal(after_frozen[n].B, frozen[n].B)
        assert not torch.equal(after_trained[n].B, train[n].B)  # the trained ones moved
        assert after_trained[n].rank == 2  # only these are read for the upload
    assert not adapters.lora_layers_present(plain)


@pytest.mark.runner
def test_runner_uploads_only_the_trained_components(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[ClientUpdate]] = []
    original = HAFLFreeze.aggregate

    def recording(self: HAFLFreeze, state: GlobalState, updates: list[ClientUpdate]) -> GlobalState:
        seen.append(list(updates))
        return original(self, state, updates)

    monkeypatch.setattr(HAFLFreeze, "aggregate", recording)
    cfg = load_config(TINY, ["strategy=hafl-freeze", "rounds=2"])  # ranks 8, 4, 2

    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["improved"] and summary["adapter_ranks"] == [8]
    for updates, row in zip(seen, rows[1:], strict=True):
        ups = {t["client"]: t for t in row["traffic"]}
        downs = {t["down_params"] for t in row["traffic"]}
        assert len(downs) == 1  # every client downloads the whole rank-8 adapter
        for u in updates:
            rank = {"client-0000": 8, "client-0001": 4, "client-0002": 2}[u.client_id]
            assert {f.rank for f in u.factors.values()} == {rank}
            assert u.component_index is not None and u.importance is not None
            per_rank = sum(f.A.shape[1] + f.B.shape[0] for f in u.factors.values())
            assert ups[u.client_id]["up_params"] == rank * per_rank
            assert downs == {8 * per_rank}
    # round 2's trained components are chosen by round 1's importance: the top r_k
    second = {u.client_id: u for u in seen[1]}
    for name, idx in second["client-0002"].component_index.items():  # type: ignore[union-attr]
        top = torch.argsort(seen_importance(seen[0], name), descending=True, stable=True)[:2]
        assert idx.tolist() == sorted(top.tolist())


def seen_importance(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    """The server importance of ``module`` after ``updates``, computed by hand, independently of
    the strategy: per component, the example-weighted mean of the scores of the clients that
    trained it."""
    rank = max(int(u.indices(module).max()) + 1 for u in updates)
    total, weight = torch.zeros(rank, dtype=torch.float64), torch.zeros(rank, dtype=torch.float64)
    for u in updates:
        assert u.importance is not None
        for j, i in enumerate(u.indices(module).tolist()):
            total[i] += u.num_examples * float(u.importance[module][j])
            weight[i] += u.num_examples
    return total / weight

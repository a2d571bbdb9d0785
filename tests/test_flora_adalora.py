"""FLoRA with AdaLoRA clients: pruned ranks are read exactly and stack exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora import adapters
from fedlora.clients import Callbacks
from fedlora.config import TrainConfig, load_config
from fedlora.data import Example, encode
from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate
from fedlora.methods import get_strategy
from fedlora.methods.flora_adalora import AdaLoRAOptions as AdaLoRAConfig
from fedlora.models import build_tiny
from fedlora.strategies import GlobalState
from fedlora.train import train_local

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
TARGETS = ["q_proj", "v_proj"]
EXAMPLES = [Example(prompt=f"what is {i} plus {i}", response=f"it is {2 * i}") for i in range(12)]


def adalora_client(model: torch.nn.Module, rank: int, seed: int, tokenizer: object) -> object:
    """Train an AdaLoRA client of initial rank ``rank`` that prunes to half of it."""
    steps = 6
    peft_model = adapters.attach_adalora(
        model, TARGETS, rank, 2.0 * rank, seed, steps, rank // 2, AdaLoRAConfig()
    )
    data = encode(EXAMPLES, tokenizer, max_length=48)  # type: ignore[arg-type]
    train_local(
        peft_model,
        data,
        TrainConfig(lr=2e-2, steps=steps),
        tokenizer.pad_token_id,  # type: ignore[attr-defined]
        seed,
        callbacks=Callbacks(after_step=peft_model.base_model.update_and_allocate),
    )
    return peft_model


def peft_delta(peft_model: object) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW of every AdaLoRA layer."""
    return {
        n: layer.get_delta_weight("default").detach()
        for n, layer in adapters.lora_layers(peft_model).items()
    }


def test_read_factors_keeps_the_unpruned_components_and_equals_peft_delta() -> None:
    model, tokenizer = build_tiny(seed=0)

    peft_model = adalora_client(model, 8, 1, tokenizer)
    factors = adapters.read_factors(peft_model)
    kept = adapters.kept_ranks(peft_model)
    expected = peft_delta(peft_model)
    adapters.detach(peft_model)

    assert sum(kept.values()) == 4 * len(kept)  # the budget: target rank 4 on average
    assert len(set(kept.values())) > 1 or min(kept.values()) < 8  # ranks shrank unequally
    for n, f in factors.items():
        assert f.rank == max(1, kept[n])
        torch.testing.assert_close(f.delta(), expected[n], rtol=1e-5, atol=1e-7)


def test_a_module_whose_components_were_all_pruned_sends_a_zero_update() -> None:
    model = build_tiny(seed=0)[0]
    peft_model = adapters.attach_adalora(model, TARGETS, 4, 8.0, 0, 10, 2, AdaLoRAConfig())
    name, layer = next(iter(adapters.lora_layers(peft_model).items()))
    with torch.no_grad():
        for other in adapters.lora_layers(peft_model).values():
            other.lora_E["default"].fill_(0.5)
        layer.lora_E["default"].zero_()

    factors = adapters.read_factors(peft_model)
    kept = adapters.kept_ranks(peft_model)
    adapters.detach(peft_model)

    assert kept[name] == 0 and factors[name].rank == 1
    assert factors[name].delta().abs().max() == 0
    assert all(kept[n] == 4 for n in kept if n != name)


def test_adalora_clients_with_unequal_final_ranks_stack_exactly() -> None:
    # Prepare: two AdaLoRA clients of initial ranks 8 and 4, trained on the same base
    model, tokenizer = build_tiny(seed=0)
    updates, deltas = [], []
    for k, (rank, n) in enumerate([(8, 3), (4, 1)]):
        peft_model = adalora_client(model, rank, k, tokenizer)
        updates.append(ClientUpdate(f"c{k}", adapters.read_factors(peft_model), n))
        deltas.append(peft_delta(peft_model))
        model = adapters.detach(peft_model)
    ranks = [{m: f.rank for m, f in u.factors.items()} for u in updates]
    assert any(len(set(r.values())) > 1 for r in ranks) or ranks[0] != ranks[1]

    # Execute
    state = get_strategy("flora-adalora").aggregate(GlobalState(), updates)

    # Assert: the stacked update is Σ p_k ΔW_k with p = 3/4, 1/4, to float precision
    for m in deltas[0]:
        exact = 0.75 * deltas[0][m] + 0.25 * deltas[1][m]
        torch.testing.assert_close(state.global_delta(m), exact, rtol=1e-5, atol=1e-7)
        assert state.base_delta[m].rank == ranks[0][m] + ranks[1][m]  # type: ignore[union-attr]


def test_a_run_reports_the_sum_of_local_ranks_before_and_after(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["strategy=flora-adalora", "train.steps=5"])  # ranks 8, 4, 2

    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert row["rank_sum_before"] == 14
        assert row["rank_sum_after"] == 4 + 2 + 1  # each client's budget: half its rank
    assert summary["rank_sum_before"] == 14 and summary["rank_sum_after"] == 7


def test_too_few_local_steps_for_the_schedule_is_a_clear_error() -> None:
    model = build_tiny(seed=0)[0]
    with pytest.raises(ConfigError, match=r"budgeting phase.*train\.steps"):
        adapters.attach_adalora(model, TARGETS, 4, 8.0, 0, 1, 2, AdaLoRAConfig())
    assert not adapters.lora_layers_present(model)

"""FedEx-LoRA: FedIT's averages as the global adapter, the exact residual merged into the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import MODULES, exact_delta, rel_err, setup_round
from fedlora import adapters
from fedlora.config import load_config
from fedlora.experiment import run_experiment
from fedlora.lora import dense_delta
from fedlora.models import build_tiny, load_model
from fedlora.weighting import client_weights

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def test_the_adapter_is_fedit_and_the_residual_makes_the_sum_exact() -> None:
    strategy, state, updates = setup_round("fedex", [4, 4, 4])
    fedit, _, _ = setup_round("fedit", [4, 4, 4])
    weights = client_weights(updates)

    new = strategy.aggregate(state, updates)
    plain = fedit.aggregate(state, updates)

    for m in MODULES:
        assert torch.equal(new.factors[m].A, plain.factors[m].A)
        assert torch.equal(new.factors[m].B, plain.factors[m].B)
        residual = dense_delta(new.base_delta[m]).double()
        expected = exact_delta(updates, weights, m) - plain.factors[m].delta().double()
        assert rel_err(residual, expected) < 1e-5
        assert float(residual.norm()) > 1e-3  # FedIT's error is real, and it is what is merged


@pytest.mark.runner
def test_the_saved_merged_model_equals_the_base_with_the_exported_adapter(tmp_path: Path) -> None:
    """Residuals in the base plus ``B̄ Ā`` on top: the exported adapter (both rounds' residuals
    stacked with the global adapter) applied to the pristine base is the merged model."""
    cfg = load_config(TINY, ["strategy=fedex", "clients.ranks=[4]", "rounds=2", "save_merged=true"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    merged = load_model(str(tmp_path / "run" / "merged"), device="cpu", dtype="float32").model
    with_adapter = adapters.load_adapter(build_tiny(seed=0)[0], tmp_path / "run" / "adapter")
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        got, expected = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert max(summary["adapter_ranks"]) > 4  # more than the global adapter alone

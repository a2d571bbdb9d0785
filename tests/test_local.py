"""A client's side of a round around any loop (``fedlora.local``): what goes wrong while the
adapters are attached leaves the model as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora import adapters
from fedlora.clients import LocalPlan, Session
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.local import open_adapters
from fedlora.lora import LoRAFactors
from fedlora.models import load_configured

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def test_a_start_that_does_not_fit_is_refused_and_the_model_left_bare() -> None:
    cfg = load_config(TINY)
    model = load_configured(cfg.model, cfg.seed).model
    name, (d_out, d_in) = next(iter(adapters.target_shapes(model, cfg.model.targets).items()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = tuple(adapters.target_shapes(model, cfg.model.targets))
    wrong = LoRAFactors(A=torch.zeros(2, d_in + 1), B=torch.zeros(d_out, 2))  # one column too many
    for start, error in [
        ({name: wrong}, f"module {name!r}: start factors of rank 2"),
        ({"no.such.module": wrong}, "start factors for unknown module 'no.such.module'"),
    ]:
        session = Session(cfg, LocalPlan(rank=4, start=start), 1, 8.0, 0, 3, shapes)
        with pytest.raises(ConfigError, match=error):
            open_adapters(model, [session])
        assert not any("lora_" in n for n, _ in model.named_modules())
        after = model.state_dict()
        assert sorted(after) == sorted(before)
        assert all(torch.equal(after[k], v) for k, v in before.items())

    opened = open_adapters(model, [Session(cfg, LocalPlan(rank=4), 1, 8.0, 0, 3, shapes)])
    assert {f.rank for f in adapters.read_factors(opened.model).values()} == {4}
    adapters.detach(opened.model)

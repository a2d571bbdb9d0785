"""The robust rule ``validation.trim``: the coordinate-wise trimmed mean, for the strategies that
average the clients' tensors (and refused by those that do not)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import setup_round
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.linalg import trimmed_mean
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import REGISTRY, get_strategy
from test_validation import TINY

AVERAGING = sorted(n for n, c in REGISTRY.items() if c.traits.averages)
OTHERS = sorted(n for n, c in REGISTRY.items() if not c.traits.averages)


def test_the_trimmed_mean_drops_each_end_and_is_the_median_at_one_half() -> None:
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(5)]
    stacked = torch.stack(values)
    median = stacked.median(dim=0).values
    torch.testing.assert_close(trimmed_mean(values, [1.0] * 5, 0.5), median, rtol=0, atol=0)
    # 5 clients, trim 0.2: the smallest and the largest dropped at every entry
    ordered = stacked.sort(dim=0).values
    torch.testing.assert_close(trimmed_mean(values, [1.0] * 5, 0.2), ordered[1:4].mean(dim=0))
    four = values[:4]
    middle = torch.stack(four).sort(dim=0).values[1:3].mean(dim=0)
    torch.testing.assert_close(trimmed_mean(four, [1.0] * 4, 0.5), middle)


def test_too_few_clients_to_trim_anyone_keep_the_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    want = sum(p * v for p, v in zip(weights, values, strict=True))
    torch.testing.assert_close(trimmed_mean(values, weights, 0.2), want)  # ⌊0.6⌋ = 0


def _with_outlier(updates: list[ClientUpdate], scale: float) -> list[ClientUpdate]:
    """The last client's ``B`` scaled by ``scale`` in every module: an update far off in every
    entry (its ``A`` kept, which frozen-``A`` methods check)."""
    last = updates[-1]
    factors = {n: LoRAFactors(A=f.A, B=f.B * scale) for n, f in last.factors.items()}
    return [*updates[:-1], dataclasses.replace(last, factors=factors)]


@pytest.mark.parametrize("name", AVERAGING)
def test_an_outlier_is_trimmed_away_whatever_its_size(name: str) -> None:
    # 4 clients, trim 0.25: one value dropped at each end of every entry, so an outlier's size
    # no longer matters; with the method's own mean it moves the aggregate
    plain, state, updates = setup_round(name, [4, 4, 4, 4])
    trimmed = get_strategy(name, trim=0.25)
    a = trimmed.aggregate(state, _with_outlier(updates, 1e6))
    b = trimmed.aggregate(state, _with_outlier(updates, 1e9))
    for module in a.factors:
        torch.testing.assert_close(a.global_delta(module), b.global_delta(module))
        honest = max(float(u.factors[module].delta().abs().max()) for u in updates[:-1])
        assert float(a.global_delta(module).abs().max()) < 10 * honest, module
    c = plain.aggregate(state, _with_outlier(updates, 1e6))
    module = next(iter(c.factors))
    assert not torch.allclose(c.global_delta(module), a.global_delta(module))


@pytest.mark.parametrize("name", AVERAGING)
def test_trim_zero_is_the_methods_own_rule(name: str) -> None:
    plain, state, updates = setup_round(name, [4, 4, 4, 4])
    a = plain.aggregate(state, updates)
    b = get_strategy(name, trim=0.0).aggregate(state, updates)
    for module in a.factors:
        assert torch.equal(a.factors[module].A, b.factors[module].A)
        assert torch.equal(a.factors[module].B, b.factors[module].B)


@pytest.mark.parametrize("name", OTHERS)
def test_a_method_that_does_not_average_refuses_a_trim(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{name}' does not average.*fedit"):
        get_strategy(name, trim=0.2)


def test_the_config_refuses_a_trim_out_of_range_or_for_flora_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match=r"validation.trim must be in \[0, 0.5\], got 0.7"):
        load_config(TINY, ["strategy=fedit", "clients.ranks=[4]", "validation.trim=0.7"])
    with pytest.raises(ConfigError, match=r"validation.trim: strategy 'flora' does not average"):
        load_config(TINY, ["strategy=flora", "validation.trim=0.2"])
    cfg = load_config(TINY, ["strategy=flexlora", "validation.trim=0.5"])
    assert cfg.validation.trim == 0.5

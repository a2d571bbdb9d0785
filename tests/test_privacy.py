"""Client-level differential privacy: each client's update is clipped and noised before it leaves
the client, on both engines, and every client's ε is accounted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import norm

from conftest import random_factors
from fedlora import privacy
from fedlora.config import PrivacyConfig, RunConfig, load_config
from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import REGISTRY, hook_for
from fedlora.methods.flora import FLoRA

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
SHAPES = {"q": (12, 10), "v": (12, 10)}


def tiny(**overrides: object) -> RunConfig:
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def factors(rank: int, seed: int, scale: float = 1.0) -> dict[str, LoRAFactors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in) in SHAPES.items():
        f = random_factors(d_out, d_in, rank, g)
        out[name] = LoRAFactors(A=f.A * scale, B=f.B * scale)
    return out


def update_norm(
    start: dict[str, LoRAFactors], got: dict[str, LoRAFactors], a: bool = True
) -> float:
    total = sum(float((got[n].B.double() - s.B.double()).square().sum()) for n, s in start.items())
    if a:
        total += sum(
            float((got[n].A.double() - s.A.double()).square().sum()) for n, s in start.items()
        )
    return math.sqrt(total)


def moved(start: dict[str, LoRAFactors], scale: float, seed: int) -> dict[str, LoRAFactors]:
    step = factors(start["q"].rank, seed)
    return {
        n: LoRAFactors(A=s.A + scale * step[n].A, B=s.B + scale * step[n].B)
        for n, s in start.items()
    }


def test_a_large_update_is_scaled_to_the_clip_norm_keeping_its_direction() -> None:
    start = factors(4, 0)
    trained = moved(start, 0.5, 1)
    cfg = PrivacyConfig(clip_norm=0.1)
    got, before = privacy.privatize(start, trained, cfg, torch.Generator())
    assert before == pytest.approx(update_norm(start, trained))
    assert before > 1.0
    assert update_norm(start, got) == pytest.approx(0.1, rel=1e-5)
    for n in SHAPES:  # same direction: got - start = (trained - start) × 0.1 / before
        want = (trained[n].B - start[n].B) * (0.1 / before)
        torch.testing.assert_close(got[n].B - start[n].B, want, rtol=1e-4, atol=1e-7)


def test_an_update_within_the_clip_norm_passes_unchanged_bit_for_bit() -> None:
    start = factors(4, 0)
    trained = moved(start, 1e-3, 1)
    got, before = privacy.privatize(
        start, trained, PrivacyConfig(clip_norm=10.0), torch.Generator()
    )
    assert before < 10.0
    for n in SHAPES:
        assert torch.equal(got[n].A, trained[n].A) and torch.equal(got[n].B, trained[n].B)


def test_noise_has_standard_deviation_sigma_times_c_and_a_frozen_a_is_untouched() -> None:
    start = {"big": LoRAFactors(A=torch.zeros(8, 4000), B=torch.zeros(500, 8))}
    cfg = PrivacyConfig(clip_norm=0.5, noise_multiplier=2.0)
    got, before = privacy.privatize(start, start, cfg, torch.Generator().manual_seed(0))
    assert before == 0.0
    for x in (got["big"].A, got["big"].B):
        assert float(x.std()) == pytest.approx(1.0, rel=0.03)
        assert abs(float(x.mean())) < 0.05
    got, _ = privacy.privatize(start, start, cfg, torch.Generator(), sent=("B",))
    assert torch.equal(got["big"].A, start["big"].A)
    assert float(got["big"].B.std()) == pytest.approx(1.0, rel=0.05)


def test_a_frozen_a_does_not_count_toward_the_norm() -> None:
    start = factors(4, 0)
    trained = {n: LoRAFactors(A=s.A + 100.0, B=s.B + 1e-4) for n, s in start.items()}
    got, before = privacy.privatize(
        start, trained, PrivacyConfig(clip_norm=1.0), torch.Generator(), ("B",)
    )
    assert before == pytest.approx(update_norm(start, trained, a=False))
    for n in SHAPES:  # B's small update is inside the bound; A is passed through as trained
        assert torch.equal(got[n].B, trained[n].B) and torch.equal(got[n].A, trained[n].A)


def test_mismatched_start_is_an_error_naming_the_module() -> None:
    with pytest.raises(ValueError, match=r"module 'q'.*rank 2"):
        privacy.privatize(
            factors(4, 0), factors(2, 0), PrivacyConfig(clip_norm=1.0), torch.Generator()
        )


def test_noise_is_secret_by_default_and_reproducible_only_with_a_seed() -> None:
    draws = [
        torch.randn(4, generator=privacy.noise_generator(PrivacyConfig(), 1, 2)) for _ in range(2)
    ]
    assert not torch.equal(draws[0], draws[1])
    seeded = PrivacyConfig(noise_seed=7)
    a, b, c = (
        torch.randn(4, generator=privacy.noise_generator(seeded, *parts))
        for parts in ((1, 2), (1, 2), (1, 3))
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def exact_gaussian_delta(eps: float, sigma: float, releases: int) -> float:
    """δ(ε) of ``releases`` composed Gaussian mechanisms of sensitivity 1 and noise σ (one
    Gaussian of noise σ/√n; Balle & Wang 2018)."""
    s = sigma / math.sqrt(releases)
    return float(
        norm.cdf(-eps * s + 1 / (2 * s)) - math.exp(eps) * norm.cdf(-eps * s - 1 / (2 * s))
    )


@pytest.mark.parametrize("sigma,releases", [(1.0, 1), (1.0, 5), (4.0, 20), (0.7, 3)])
def test_epsilon_is_a_valid_and_reasonably_tight_bound(sigma: float, releases: int) -> None:
    delta = 1e-5
    eps = privacy.epsilon(sigma, releases, delta)
    assert exact_gaussian_delta(eps, sigma, releases) <= delta  # the accounted ε holds
    assert exact_gaussian_delta(0.6 * eps, sigma, releases) > delta  # and is not vacuous


def test_epsilon_grows_with_uploads_and_shrinks_with_noise() -> None:
    assert privacy.epsilon(1.0, 0, 1e-5) == 0.0
    assert math.isinf(privacy.epsilon(0.0, 3, 1e-5))
    assert privacy.epsilon(1.0, 2, 1e-5) < privacy.epsilon(1.0, 3, 1e-5)
    assert privacy.epsilon(2.0, 3, 1e-5) < privacy.epsilon(1.0, 3, 1e-5)
    assert privacy.epsilon(1.0, 3, 1e-3) < privacy.epsilon(1.0, 3, 1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"privacy.noise_multiplier": 1.0}, "privacy.clip_norm is 0"),
        ({"privacy.clip_norm": -1.0}, "must be >= 0"),
        ({"privacy.clip_norm": 1.0, "privacy.delta": 1.5}, "privacy.delta must be in"),
        ({"privacy.clip_norm": 1.0, "strategy": "centralized"}, "sends nothing"),
        ({"privacy.clip_norm": 1.0, "strategy": "hafl-truncate"}, "importance scores"),
        ({"privacy.clip_norm": 1.0, "strategy": "flora-adalora"}, "kept ranks"),
    ],
)
def test_privacy_settings_are_checked(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_every_upload_is_the_clipped_update_of_its_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real run: each client's privatize output is exactly what the server
    aggregates, its update is within the clip norm, and the tiny bound really clips."""
    made: list[tuple[float, dict[str, LoRAFactors], dict[str, LoRAFactors]]] = []
    real_privatize = privacy.privatize

    def spy(start, trained, cfg, generator, sent=("A", "B")):  # type: ignore[no-untyped-def]
        got, before = real_privatize(start, trained, cfg, generator, sent)
        made.append((before, start, got))
        return got, before

    seen: list[list[ClientUpdate]] = []
    real_aggregate = FLoRA.aggregate

    def aggregate(self, state, updates):  # type: ignore[no-untyped-def]
        seen.append(list(updates))
        return real_aggregate(self, state, updates)

    monkeypatch.setattr(privacy, "privatize", spy)
    monkeypatch.setattr(FLoRA, "aggregate", aggregate)
    run_experiment(tiny(**{"privacy.clip_norm": 1e-3}), tmp_path / "run", progress=False)
    uploads = [u for round_updates in seen for u in round_updates]
    assert len(made) == len(uploads) == 2 * 3  # 2 rounds × 3 clients
    for (before, start, got), update in zip(made, uploads, strict=True):
        assert before > 1e-3  # the bound bites
        assert update_norm(start, got) == pytest.approx(1e-3, rel=1e-4)
        for n, f in got.items():
            assert torch.equal(update.factors[n].A, f.A) and torch.equal(update.factors[n].B, f.B)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"]["epsilon_max"] is None  # clipping alone guarantees nothing
    assert "no privacy guarantee" in (tmp_path / "run" / "summary.md").read_text()


def test_a_noised_run_reports_each_clients_epsilon(tmp_path: Path) -> None:
    cfg = tiny(**{"privacy.clip_norm": 0.05, "privacy.noise_multiplier": 1.5, "rounds": 3,
                  "clients.fraction": 0.67})  # fmt: skip
    run_experiment(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    priv = summary["privacy"]
    counts: dict[str, int] = {}
    for row in rows[1:]:
        for cid in row["clients"]:
            counts[cid] = counts.get(cid, 0) + 1
        assert row["epsilon"] == pytest.approx(privacy.epsilon(1.5, max(counts.values()), 1e-5))
    assert priv["uploads"] == counts and len(counts) == 3
    assert min(counts.values()) < 3  # partial participation: clients spend different budgets
    for cid, n in counts.items():
        assert priv["epsilon"][cid] == pytest.approx(privacy.epsilon(1.5, n, 1e-5))
    assert priv["epsilon_max"] == max(priv["epsilon"].values())
    assert f"ε ≤ {priv['epsilon_max']:.3g}" in (tmp_path / "run" / "summary.md").read_text()
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    # neither is covered by the noise, so neither leaves a private client
    assert all(r["train_loss"] is None for r in rows)
    assert priv["withheld"] == ["training loss", "example count"]


PRIVATE_STRATEGIES = [name for name in sorted(REGISTRY) if hook_for(name).also_sends is None]
"""Every method whose clients send nothing but (noised) factors: what privacy accepts."""


@pytest.mark.parametrize("strategy", PRIVATE_STRATEGIES)
def test_every_strategy_whose_uploads_are_all_noised_runs_privately(
    strategy: str, tmp_path: Path
) -> None:
    ranks = "[8,4,2]" if REGISTRY[strategy].traits.mixed_ranks else "[4]"
    cfg = tiny(**{"strategy": strategy, "clients.ranks": ranks, "rounds": 1,
                  "privacy.clip_norm": 0.05, "privacy.noise_multiplier": 1.0})  # fmt: skip
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["privacy"]["epsilon_max"] == pytest.approx(privacy.epsilon(1.0, 1, 1e-5))
    assert math.isfinite(summary["final"])


def test_the_allowed_list_is_every_strategy_the_config_accepts() -> None:
    assert {"fedit", "flora", "ffa", "rolora", "fedsa"} <= set(PRIVATE_STRATEGIES)
    assert not {"hafl-truncate", "hafl-freeze", "flora-adalora"} & set(PRIVATE_STRATEGIES)
    accepted = []
    for name in sorted(REGISTRY):
        try:
            tiny(**{"strategy": name, "clients.ranks": "[4]", "privacy.clip_norm": 1.0})
            accepted.append(name)
        except ConfigError:
            pass
    assert sorted(accepted) == sorted(PRIVATE_STRATEGIES)

"""Helpers shared by the tests: random client updates of given ranks, states that fit them."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest
import torch

from fedlora.lora import ClientUpdate, LoRAFactors, fold_scaling
from fedlora.methods import get_strategy, hook_for
from fedlora.strategies import GlobalState, Strategy

MODULES = {"q_proj": (12, 10), "v_proj": (6, 10)}  # name -> (d_out, d_in)


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never read or write the user's caches: fedlora's converted models (so the first
    load of the default model in a session converts the shipped GGUF), matplotlib's, and those
    of anything that follows XDG; subprocesses inherit the same folders."""
    root = tmp_path_factory.mktemp("caches")
    patch = pytest.MonkeyPatch()
    for var in ("FEDLORA_CACHE", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        patch.setenv(var, str(root / var.lower()))
    yield
    patch.undo()


@pytest.fixture
def hardware_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.dtype = "auto"`` follows the hardware in this test, even where the suite runs
    with ``FEDLORA_AUTO_DTYPE`` set (the suite's run as another kind of machine)."""
    monkeypatch.delenv("FEDLORA_AUTO_DTYPE", raising=False)


if os.environ.get("FEDLORA_MUTATION"):
    # Under `make mutation` a failing example is a killed mutant: stop at it rather than shrink
    # it (shrinking re-runs the property many times, for a report nobody reads there).
    from hypothesis import Phase
    from hypothesis import settings as _settings

    _settings.register_profile(
        "mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate], deadline=None
    )
    _settings.load_profile("mutation")


def examples(n: int) -> int:
    """Hypothesis examples for a property: ``n``, or at most 10 under ``make mutation``.

    A mutant is killed by the first failing example, and one that makes a property slow would
    otherwise cost ``n`` slow examples before mutmut's time-out; ``make test`` runs all ``n``.
    """
    return min(n, 10) if os.environ.get("FEDLORA_MUTATION") else n


def random_factors(
    d_out: int, d_in: int, rank: int, gen: torch.Generator, alpha: float | None = None
) -> LoRAFactors:
    """PEFT-like factors ``(A₀, B₀)`` with a trained (non-zero) ``B₀``, scaling ``α/r`` folded."""
    A = torch.randn(rank, d_in, generator=gen)
    B = torch.randn(d_out, rank, generator=gen)
    alpha = 2.0 * rank if alpha is None else alpha
    return fold_scaling(A, B, alpha / rank)


def make_updates(
    ranks: Sequence[int],
    seed: int = 0,
    modules: dict[str, tuple[int, int]] | None = None,
    alphas: Sequence[float] | None = None,
    examples: Sequence[int] | None = None,
    shared: GlobalState | None = None,
) -> list[ClientUpdate]:
    """One update per rank, ids ``c0, c1, …``; with ``shared`` (FFA) ``A`` is ``A_0``'s rows."""
    gen = torch.Generator().manual_seed(seed)
    modules = MODULES if modules is None else modules
    updates = []
    for k, r in enumerate(ranks):
        factors = {}
        for name, (d_out, d_in) in modules.items():
            alpha = None if alphas is None else alphas[k]
            f = random_factors(d_out, d_in, r, gen, alpha)
            if shared is not None:
                f = LoRAFactors(A=shared.factors[name].A[:r].clone(), B=f.B)
            factors[name] = f
        n = examples[k] if examples is not None else 10 + 7 * k
        updates.append(ClientUpdate(f"c{k}", factors, n))
    return updates


def setup_round(
    name: str, ranks: Sequence[int], seed: int = 0, **options: object
) -> tuple[Strategy, GlobalState, list[ClientUpdate]]:
    """A strategy, its initial state and client updates that fit it."""
    strategy = get_strategy(name, **options)
    state = strategy.init_state(MODULES, max(ranks), torch.Generator().manual_seed(seed + 1000))
    frozen_a = "A" not in hook_for(name).sent(strategy.client_options(state))
    shared = state if frozen_a else None  # A is the state's where clients hold it frozen
    return strategy, state, make_updates(ranks, seed, shared=shared)


def exact_delta(
    updates: Sequence[ClientUpdate], weights: Sequence[float], module: str
) -> torch.Tensor:
    """``Σ p_k B_k A_k`` computed densely in float64, the reference every exact rule must hit."""
    return sum(
        (p * u.factors[module].delta().double() for p, u in zip(weights, updates, strict=True)),
        start=torch.zeros(updates[0].factors[module].shape, dtype=torch.float64),
    )


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float(torch.linalg.norm(got.double() - expected) / torch.linalg.norm(expected))

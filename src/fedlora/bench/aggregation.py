"""Benchmark: every strategy's aggregation plus redistribution on one projection, and FlexLoRA's
factored SVD against the reference code's dense SVD, side by side in one process.

Default setting: ``d_in = d_out = 4096`` (a Llama-7B attention projection) and FLoRA's ranks
``[64, 32, 16, 16, 8, 8, 4, 4, 4, 4]``. The dense baseline builds ``ΔW_g = Σ p_k B_k A_k``
(4096 × 4096), runs one ``torch.linalg.svd`` and slices each distinct rank's truncation; that is
kinder to it than the reference code, which also recomputes the truncation per client.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from fedlora.lora import ClientUpdate, LoRAFactors
from fedlora.methods import REGISTRY, get_strategy, hook_for
from fedlora.strategies import GlobalState, Strategy
from fedlora.weighting import client_weights

DEFAULT_RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)
MODULE = "q_proj"


@dataclass
class AggregationBench:
    """Figures of one run of the benchmark; seconds are the median of ``repeat`` runs."""

    d_in: int
    d_out: int
    ranks: list[int]
    repeat: int
    flexlora_dense_s: float
    flexlora_factored_s: float
    speedup: float
    max_rel_err: float
    """Factored FlexLoRA against the dense float32 SVD (both float32: the sum of both errors)."""
    factored_vs_float64: float
    """Factored FlexLoRA's largest relative error against a dense float64 SVD of the float64
    ``ΔW_g``: its own error, whichever CPU's kernels computed it."""
    dense_vs_float64: float
    """The dense float32 SVD's (the reference code's) against the same float64 reference."""
    strategies: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)
    torch_version: str = torch.__version__
    torch_threads: int = field(default_factory=torch.get_num_threads)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_updates(
    d_in: int,
    d_out: int,
    ranks: Sequence[int],
    generator: torch.Generator,
    shared_a: LoRAFactors | None = None,
) -> list[ClientUpdate]:
    """Clients with trained-looking factors: ``A`` at PEFT's init scale (or rows of a shared
    ``A_0``), ``B`` random, scaling ``α/r = 2`` folded in, 50–500 examples each."""
    updates = []
    for k, r in enumerate(ranks):
        A = (torch.rand(r, d_in, generator=generator) * 2 - 1) / d_in**0.5
        if shared_a is not None:
            A = shared_a.A[:r].clone()
        B = torch.randn(d_out, r, generator=generator) * 0.01 * 2.0
        n = int(torch.randint(50, 501, (1,), generator=generator))
        updates.append(ClientUpdate(f"client-{k:03d}", {MODULE: LoRAFactors(A=A, B=B)}, n))
    return updates


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _round_trip(strategy: Strategy, state: GlobalState, updates: list[ClientUpdate]) -> None:
    new = strategy.aggregate(state, updates)
    strategy.redistribute(new, [u.factors[MODULE].rank for u in updates])


def exact_delta(
    updates: Sequence[ClientUpdate], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``Σ_k p_k B_k A_k`` densely in ``dtype``, weights by data size: the target every exact rule
    must hit."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    f = ordered[0].factors[MODULE]
    delta = torch.zeros(f.shape, dtype=dtype, device=f.A.device)
    for p, u in zip(client_weights(ordered), ordered, strict=True):
        delta += p * u.factors[MODULE].to(dtype).delta()
    return delta


def dense_flexlora(
    updates: Sequence[ClientUpdate], ranks: Sequence[int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """The reference code's way: dense ``ΔW_g``, dense SVD, a dense truncation per distinct rank,
    in ``dtype`` (float32 as the reference code; float64 as the reference for both).
    Returns the singular values, ``{r: ΔW_r}`` and ``ΔW_g``."""
    delta = exact_delta(updates, dtype)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    truncations = {r: (U[:, :r] * S[:r]) @ Vh[:r] for r in sorted(set(ranks))}
    return S, truncations, delta


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-30))


def flexlora_error(
    state: GlobalState, dense_s: torch.Tensor, dense_truncations: dict[int, torch.Tensor]
) -> float:
    """Largest relative difference of the factored result from the dense one: singular values
    (relative to the largest) and each distinct rank's truncated ``ΔW`` (Frobenius)."""
    factors = state.factors[MODULE]
    s_factored = torch.linalg.norm(factors.B, dim=0)  # B = U S with orthonormal U
    q = min(s_factored.numel(), dense_s.numel())
    errors = [float((s_factored[:q] - dense_s[:q]).abs().max() / dense_s[0])]
    for r, expected in dense_truncations.items():
        got = factors.B[:, :r] @ factors.A[:r]
        errors.append(_relative(got, expected))
    return max(errors)


def run_aggregation_bench(
    d_in: int = 4096,
    d_out: int = 4096,
    ranks: Sequence[int] = DEFAULT_RANKS,
    repeat: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> AggregationBench:
    """Time every registered strategy and the dense FlexLoRA baseline; see the module docstring."""
    say = progress or (lambda _msg: None)
    generator = torch.Generator().manual_seed(seed)
    updates = synthetic_updates(d_in, d_out, ranks, generator)
    timings: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name in sorted(REGISTRY):
        strategy = get_strategy(name)
        mine = list(ranks)
        if not strategy.traits.mixed_ranks:
            homogeneous = int(statistics.median(ranks))
            mine = [homogeneous] * len(ranks)
            notes[name] = f"homogeneous rank {homogeneous} (needs equal ranks)"
        state = strategy.init_state({MODULE: (d_out, d_in)}, max(mine), generator)
        clients = updates
        if "A" not in hook_for(name).sent(strategy.client_options(state)):  # A frozen: the state's
            clients = synthetic_updates(d_in, d_out, mine, generator, state.factors[MODULE])
        elif mine != list(ranks):
            clients = synthetic_updates(d_in, d_out, mine, generator)
        say(f"timing {name}")
        timings[name] = _median_seconds(partial(_round_trip, strategy, state, clients), repeat)

    say(f"dense SVD reference of a {d_out}x{d_in} matrix")
    start = time.perf_counter()
    dense_s, dense_truncations, delta = dense_flexlora(updates, ranks)
    dense_seconds = time.perf_counter() - start

    factored_state = get_strategy("flexlora").aggregate(GlobalState(), updates)
    full = factored_state.factors[MODULE]
    rel_err = max(
        flexlora_error(factored_state, dense_s, dense_truncations),
        _relative(full.delta(), delta),  # nothing lost at rank R = Σ r_k
    )
    say("float64 SVD reference of both")
    s64, truncations64, delta64 = dense_flexlora(updates, ranks, torch.float64)
    factored64 = GlobalState(factors={MODULE: full.to(torch.float64)})
    vs64 = max(
        flexlora_error(factored64, s64, truncations64), _relative(full.delta().double(), delta64)
    )
    dense_vs64 = dense_error(dense_s, dense_truncations, s64, truncations64)
    factored_seconds = timings["flexlora"]
    return AggregationBench(
        d_in=d_in,
        d_out=d_out,
        ranks=list(ranks),
        repeat=repeat,
        flexlora_dense_s=dense_seconds,
        flexlora_factored_s=factored_seconds,
        speedup=dense_seconds / factored_seconds,
        max_rel_err=rel_err,
        factored_vs_float64=vs64,
        dense_vs_float64=dense_vs64,
        strategies=timings,
        notes=notes,
    )


def dense_error(
    s: torch.Tensor,
    truncations: dict[int, torch.Tensor],
    reference_s: torch.Tensor,
    reference: dict[int, torch.Tensor],
) -> float:
    """Largest relative difference of one dense SVD's result from another's (as
    :func:`flexlora_error` measures the factored one)."""
    q = min(s.numel(), reference_s.numel())
    errors = [float((s[:q].double() - reference_s[:q]).abs().max() / reference_s[0])]
    errors += [_relative(truncations[r].double(), reference[r]) for r in reference]
    return max(errors)


def format_table(result: AggregationBench) -> str:
    """A plain-text table of the figures, for the terminal."""
    lines = [
        f"aggregation + redistribution, one {result.d_out}x{result.d_in} module, "
        f"ranks {result.ranks}, median of {result.repeat} (torch {result.torch_version}, "
        f"{result.torch_threads} threads)",
        f"{'strategy':<12} {'seconds':>10}  note",
    ]
    for name, seconds in sorted(result.strategies.items()):
        lines.append(f"{name:<12} {seconds:>10.4f}  {result.notes.get(name, '')}")
    lines += [
        f"{'dense SVD':<12} {result.flexlora_dense_s:>10.4f}  FlexLoRA as the reference code does",
        f"speedup of factored FlexLoRA over dense: {result.speedup:.0f}x   "
        f"max relative error: {result.max_rel_err:.2e}",
        f"against a float64 SVD: factored {result.factored_vs_float64:.2e}, dense float32 "
        f"{result.dense_vs_float64:.2e}",
    ]
    return "\n".join(lines)

"""FedSRD: sparsify, reconstruct, decompose (WWW 2026, arXiv:2510.04601, "FedSRD:
Sparsify-Reconstruct-Decompose for Communication-Efficient Federated Large Language Models
Fine-Tuning"; official code ``Youth-49/FedSRD_2025``, ``main_fedsrd.py`` and
``federated_learning/fed_global.py``).

Rule, one round ``t = 1, 2, …`` (the paper's Algorithm 1), every client at the server's rank:

1. *Sparsify* (client, :class:`SparseDeltaClient`): from the global ``(A_g, B_g)`` a client
   trains both factors to ``(A_k, B_k)`` and sends only the largest entries of its deltas
   ``ΔA = A_k − A_g``, ``ΔB = B_k − B_g`` by an importance that weighs each entry by the
   factor it multiplies: ``I(ΔA)[u, v] = |ΔA[u, v]| · ‖B_k[:, u]‖`` and ``I(ΔB)[u, v] = |ΔB[u, v]|
   · ‖A_g[v, :]‖`` (Eq. 6). Per matrix, entries with ``I`` below its ``ρ``-quantile are dropped,
   ``ρ = base + min(upper, coeff · ln max(κ, 1))`` with ``κ`` the (Pearson) kurtosis of the
   scores (Eq. 7: heavier tails, sparser upload), and the kept entries are rescaled by
   ``‖Δ‖₁ / ‖Δ_s‖₁`` (the code's, not in the paper's text). The remainder is dropped, no error
   feedback.
2. *Reconstruct* (server): ``W = Σ_k p_k (B_g + ΔB_k) (A_g + ΔA_k)``, exact, from the sparse
   uploads.
3. *Decompose*: ``W_r``, the rank-``r`` truncated SVD of ``W`` (``svd = false``: ``W`` itself,
   the paper's FedSRD-e), and the update ``ΔW = W_r − B_g A_g`` is carried by one factor, the other
   held: in odd rounds ``ΔB = ΔW A_g⁺`` (``ΔA = 0``), in even rounds ``ΔA = B_g⁺ ΔW``
   (``ΔB = 0``). That factor's delta is then sparsified for the download by a random mask that
   keeps each entry with probability ``1 − drop`` and rescales it by ``1 / (1 − drop)`` (DARE);
   the server applies the same sparse delta it sends, so it stays in step with its clients.

Differences from the official code, and why:
- Rounds are counted from 1 as in the paper, so round 1 updates ``B``. The code counts from 0 and
  updates ``A`` first: ``ΔA = B_g⁺ ΔW`` with ``B_g = 0`` is zero, and its first round is lost.
- The products use the factors (``W_r`` from the factored SVD of the stacked uploads,
  :func:`fedlora.linalg.svd_factors`; ``ΔB = B_w (A_w A_g⁺) − B_g (A_g A_g⁺)``), never the dense
  ``d_out × d_in`` matrix of the code; the same numbers, in float64 for the pseudo-inverse (the
  code uses float32), returned in float32.
- ``p_k`` follows ``weighting`` (by examples by default); the code's scripts average uniformly
  (``--simple_aggr``): ``weighting = "uniform"`` for its setting.
- The download mask is drawn from a generator seeded by ``mask_seed``, the round and the module,
  so a resumed run draws the same masks.
- Traffic: a reply counts the non-zeros of its sparse deltas plus a one-bit-per-entry bitmap
  (:meth:`SparseDeltaClient.upload_params`). fedlora's clients hold nothing between rounds
  (partial participation), so each downloads the whole global adapter, as every method's clients
  do here; the code's clients all take part every round and download only the round's sparse
  delta (about ``1 − drop`` of one factor).
- Defaults are the code's (``base = 0.85``, ``coeff = 0.1``, ``upper = 0.11``) and its scripts'
  download ``drop = 0.8`` (its config's default is 0.9).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlora.clients.base import ClientHook, LocalPlan, Upload
from fedlora.comm import BYTES_PER_PARAM
from fedlora.errors import ConfigError
from fedlora.linalg import stack, svd_factors, truncate, work_dtype
from fedlora.lora import LoRAFactors
from fedlora.schema import method_options
from fedlora.strategies.base import (
    GlobalState,
    RoundInput,
    Strategy,
    Traits,
    register,
    server_factors,
)


@method_options("fedsrd")
@dataclass
class FedSRDOptions:
    """FedSRD's sparsity on both sides (strategy ``fedsrd``); the official code's defaults."""

    base: float = 0.85
    """The upload's least dropped fraction per matrix (the paper's ``α``)."""
    coeff: float = 0.1
    """How much heavier-tailed importance adds to it: ``coeff · ln κ``."""
    upper: float = 0.11
    """The most the tail adds (``base + upper < 1``)."""
    drop: float = 0.8
    """The download's dropped fraction of the updated factor's delta (DARE); 0: dense."""
    svd: bool = True
    """Decompose the rank-``r`` truncation of the aggregate; false: the aggregate itself
    (FedSRD-e)."""
    mask_seed: int = 0
    """Seeds the download masks (with the round and the module)."""

    def check(self) -> None:
        if not (0 <= self.base < 1 and self.coeff >= 0 and self.upper >= 0):
            raise ConfigError(
                "fedsrd.base must be in [0, 1), fedsrd.coeff and fedsrd.upper >= 0; got "
                f"{self.base}, {self.coeff}, {self.upper}"
            )
        if self.base + self.upper >= 1:
            raise ConfigError(
                f"fedsrd.base + fedsrd.upper must be < 1 (the largest dropped fraction), got "
                f"{self.base} + {self.upper}"
            )
        if not 0 <= self.drop < 1:
            raise ConfigError(f"fedsrd.drop must be in [0, 1), got {self.drop}")


def drop_ratio(scores: torch.Tensor, options: FedSRDOptions) -> float:
    """Eq. 7: ``base + min(upper, coeff · ln max(κ, 1))``, ``κ`` the Pearson kurtosis (``E[(x −
    μ)⁴] / σ⁴``, population moments, as scipy's ``kurtosis(fisher=False)``) of ``scores``."""
    x = scores.flatten().double()
    centred = x - x.mean()
    var = centred.square().mean()
    kurtosis = float(centred.pow(4).mean() / var.square()) if var > 0 else 1.0
    return options.base + min(options.upper, options.coeff * math.log(max(kurtosis, 1.0)))


def sparsify(delta: torch.Tensor, scores: torch.Tensor, options: FedSRDOptions) -> torch.Tensor:
    """``delta`` without its entries scored below the ``ρ``-quantile of ``scores``
    (:func:`drop_ratio`), the kept ones rescaled to ``delta``'s L1 norm."""
    threshold = torch.quantile(scores.flatten().double(), drop_ratio(scores, options))
    kept = torch.where(scores.double() >= threshold, delta, torch.zeros_like(delta))
    mass = kept.abs().sum()
    return kept * (delta.abs().sum() / mass) if mass > 0 else kept


def nonzeros(delta: torch.Tensor) -> int:
    """What a sparse ``delta`` costs to send, in numbers: its non-zeros and a one-bit-per-entry
    bitmap of where they are."""
    return int(torch.count_nonzero(delta)) + math.ceil(delta.numel() / (8 * BYTES_PER_PARAM))


class SparseDeltaClient(ClientHook):
    """Trains both factors from the global adapter and sends them as ``start + Δ_s``, the deltas
    sparsified by importance (step 1 of the rule)."""

    def finish(self, upload: Upload) -> Upload:
        start = self.session.plan.start
        if start is None:
            raise ConfigError("fedsrd: a client needs the global adapter as its start")
        sent = self.session.plan.options
        options = FedSRDOptions(
            base=float(sent["base"]), coeff=float(sent["coeff"]), upper=float(sent["upper"])
        )
        factors = {}
        for name, f in upload.factors.items():
            g = start[name].to(f.A.dtype)
            dA, dB = f.A - g.A, f.B - g.B
            score_A = dA.abs() * torch.linalg.vector_norm(f.B, dim=0)[:, None]
            score_B = dB.abs() * torch.linalg.vector_norm(g.A, dim=1)[None, :]
            factors[name] = LoRAFactors(
                A=g.A + sparsify(dA, score_A, options), B=g.B + sparsify(dB, score_B, options)
            )
        return Upload(factors, upload.kept, upload.importance, upload.next_rank)

    @classmethod
    def upload_params(cls, factors: Mapping[str, LoRAFactors], plan: LocalPlan) -> int:
        if plan.start is None:
            return super().upload_params(factors, plan)
        return sum(
            nonzeros(f.A - plan.start[name].A.to(f.A)) + nonzeros(f.B - plan.start[name].B.to(f.B))
            for name, f in factors.items()
        )


@register
class FedSRD(Strategy):
    name = "fedsrd"
    client = SparseDeltaClient
    Options = FedSRDOptions
    options: FedSRDOptions
    traits = Traits(paper="FedSRD (WWW 2026)", mixed_ranks=False, projects=True)

    def client_options(self, state: GlobalState) -> dict[str, bool | int | float | str]:
        """The upload's sparsity settings, for :class:`SparseDeltaClient`."""
        del state
        o = self.options
        return {"base": o.base, "coeff": o.coeff, "upper": o.upper}

    def _check(self, rnd: RoundInput) -> None:
        for update in rnd.updates:
            for module in update.factors:
                server_factors(rnd, update, module)

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        held = rnd.state.factors[module]
        t = rnd.state.round + 1
        dtype = work_dtype(held.A.dtype)
        W = stack(rnd.factors(module), rnd.weights)  # Σ p_k B_k A_k, factored
        if self.options.svd:
            W = truncate(svd_factors(W), min(held.rank, W.rank))
        A, B = held.A.to(dtype), held.B.to(dtype)
        if t % 2 == 1:  # ΔB = (W_r − B A) A⁺
            pinv = torch.linalg.pinv(A.double())
            delta = (W.B.double() @ (W.A.double() @ pinv) - B.double() @ (A.double() @ pinv)).to(
                dtype
            )
            return LoRAFactors(A=A, B=B + self._masked(delta, t, module))
        pinv = torch.linalg.pinv(B.double())  # ΔA = B⁺ (W_r − B A)
        delta = ((pinv @ W.B.double()) @ W.A.double() - (pinv @ B.double()) @ A.double()).to(dtype)
        return LoRAFactors(A=A + self._masked(delta, t, module), B=B)

    def _masked(self, delta: torch.Tensor, t: int, module: str) -> torch.Tensor:
        """DARE: each entry kept with probability ``1 − drop``, rescaled by ``1 / (1 − drop)``."""
        drop = self.options.drop
        if drop == 0:
            return delta
        seed = zlib.crc32(f"{self.options.mask_seed}:{t}:{module}".encode())
        generator = torch.Generator(device=delta.device).manual_seed(seed)
        keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= drop
        return torch.where(keep, delta / (1 - drop), torch.zeros_like(delta))

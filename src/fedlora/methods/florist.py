"""FLoRIST: singular value thresholding of the stacked adapters (Ramesh and Dass, "FLoRIST:
Singular Value Thresholding for Efficient and Accurate Federated Fine-Tuning of Large Language
Models", arXiv 2506.09199, MLSys 2026; official code ``Anonymous-user-00/FLoRIST``,
``model_aggregation.py`` and ``main.py``).

Rule, as the official code runs it: the clients' adapters are stacked as FLoRA does, so
``B_s A_s = Σ_k p_k B_k A_k`` exactly; per module, the SVD of that sum is cut at the smallest
rank ``p`` whose singular values hold a fraction ``τ`` of the energy,
``Σ_{i≤p} σ_i² ≥ τ Σ_i σ_i²``, and the pair ``B_p = U_p Σ_p``, ``A_p = V_pᵀ`` is **merged into
the base weights** (in float32, :class:`fedlora.precision.MergedBase`, as FLoRA's update is, on
the server and on every Flower node); every client starts the next round from a **fresh adapter**
of its own rank. The SVD is computed in the small stacked space (QR of ``B_s`` and ``A_sᵀ``, SVD
of the ``R × R`` core: :func:`fedlora.linalg.factored_svd`), never on the dense
``d_out × d_in`` update.

``τ`` (``[florist] tau``) trades accuracy for traffic: a round's merged pair is within
``√(1 − τ)`` (relative Frobenius) of that round's exact sum, and each client downloads the rank-
``p`` pair of every round it missed instead of FLoRA's stack of rank ``R = Σ r_k`` (what the
official scheme sends; ``fedlora bench comm`` measures both). The thresholding error of a round
is merged with it and never revisited: the accumulated update is the sum of the rounds'
thresholded pairs, and a round in which no client learns anything changes nothing. With
``τ = 1`` it is FLoRA with the stack compressed to its rank.

Choices where the paper leaves room: energy is the sum of squared singular values (so the bound
above holds); the rank is chosen per module (each adapted weight has its own spectrum); ``S``
goes into ``B``. An earlier fedlora version kept the pair as a global adapter that clients
warm-started from (FlexLoRA's redistribution) and thresholded the whole accumulated model again
each round; that is not the authors' scheme (its error compounded over rounds and a no-op round
changed the model) and was removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.errors import ConfigError
from fedlora.linalg import compact, stack, svd_factors, truncate
from fedlora.lora import LoRAFactors
from fedlora.schema import method_options
from fedlora.strategies.base import GlobalState, RoundInput, Strategy, Traits, register


@method_options("florist")
@dataclass
class FloristOptions:
    """FLoRIST's server-side threshold (strategy ``florist``)."""

    tau: float = 0.9
    """Fraction of the stacked update's energy (``Σ σ²``) the global pair keeps, in ``(0, 1]``."""

    def check(self) -> None:
        if not 0 < self.tau <= 1:
            raise ConfigError(f"florist.tau must be in (0, 1], got {self.tau}")


def energy_rank(singular_values: torch.Tensor, tau: float) -> int:
    """The smallest ``p >= 1`` with ``Σ_{i<p} σ_i² >= τ Σ σ²`` (``σ`` descending)."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(energy, dim=0)
    # The first index whose cumulative energy reaches τ·total; a relative slack keeps τ = 1 from
    # asking for components whose energy is rounding noise.
    reached = cumulative >= (tau * total) * (1 - 1e-12)
    return int(torch.nonzero(reached)[0, 0]) + 1


@register
class FLoRIST(Strategy):
    name = "florist"
    traits = Traits(
        paper="Ramesh and Dass 2025 (FLoRIST)",
        mixed_ranks=True,
        merges_into_base=True,
        fresh_client_adapters=True,
    )
    Options = FloristOptions
    options: FloristOptions

    def error_bound(self) -> float:
        """``√(1 − τ)``: the pair keeps at least ``τ`` of the stack's energy."""
        return float((1 - self.options.tau) ** 0.5)

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        """The round's thresholded pair: ``(A_p: (p, d_in), B_p: (d_out, p))``."""
        svd = svd_factors(stack(rnd.factors(module), rnd.weights))
        singular_values = torch.linalg.vector_norm(svd.B, dim=0)  # B' = U diag(S): ‖B'[:, i]‖ = σ_i
        kept = truncate(svd, energy_rank(singular_values, self.options.tau))
        return LoRAFactors(A=kept.A.contiguous(), B=kept.B.contiguous())

    def _aggregate(self, rnd: RoundInput) -> GlobalState:
        delta = {m: compact(self._combine(rnd, m)) for m in rnd.modules}
        return GlobalState(base_delta=delta, round=rnd.state.round + 1)

"""FLoRIST: singular value thresholding of the stacked adapters (Ramesh and Dass, "FLoRIST:
Singular Value Thresholding for Efficient and Accurate Federated Fine-Tuning of Large Language
Models", arXiv 2506.09199, MLSys 2026).

Rule: the clients' adapters are stacked as FLoRA does, so ``B_s A_s = Σ_k p_k B_k A_k`` exactly;
its SVD is computed in the small stacked space (QR of ``B_s`` and ``A_sᵀ``, SVD of the ``R × R``
core: :func:`fedlora.linalg.factored_svd`, never the dense ``d_out × d_in`` update); per module,
the smallest ``p`` whose singular values hold a fraction ``τ`` of the energy,
``Σ_{i≤p} σ_i² ≥ τ Σ_i σ_i²``, is kept as one global pair ``B_g = U_p Σ_p``, ``A_g = V_pᵀ`` of
rank ``p``. Each client starts the next round from its first ``min(r_k, p)`` components (the best
approximation of that rank; any further components of its own rank start fresh), and the global
model is ``B_g A_g``.

``τ`` (``[florist] tau``) trades accuracy for traffic: the relative Frobenius error of the global
pair against the exact sum is at most ``√(1 − τ)``, and a client downloads ``min(r_k, p)`` rank-1
components per module instead of FLoRA's ``R = Σ r_k`` (``fedlora bench comm`` measures both).
With ``τ = 1`` it is FlexLoRA (:mod:`fedlora.strategies.flexlora`), components of zero energy
dropped.

Choices where the paper leaves room: energy is the sum of squared singular values (so the bound
above holds); the rank is chosen per module (each adapted weight has its own spectrum); ``S``
goes into ``B`` as FlexLoRA does; the paper's clients receive the global pair at its rank ``p``,
which a client of rank ``r_k < p`` cannot train, so each client receives the truncation to its
rank (FlexLoRA's redistribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.config import method_options
from fedlora.errors import ConfigError
from fedlora.linalg import stack, svd_factors, truncate
from fedlora.lora import LoRAFactors
from fedlora.strategies.base import RoundInput, Strategy, Traits, register
from fedlora.weighting import Weighting


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
    traits = Traits(paper="Ramesh and Dass 2025 (FLoRIST)", mixed_ranks=True)
    Options = FloristOptions

    def __init__(
        self, weighting: Weighting = "examples", options: FloristOptions | None = None
    ) -> None:
        super().__init__(weighting)
        self.options = options or FloristOptions()
        self.options.check()

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        svd = svd_factors(stack(rnd.factors(module), rnd.weights))
        singular_values = torch.linalg.vector_norm(svd.B, dim=0)  # B' = U diag(S): ‖B'[:, i]‖ = σ_i
        kept = truncate(svd, energy_rank(singular_values, self.options.tau))
        return LoRAFactors(A=kept.A.contiguous(), B=kept.B.contiguous())

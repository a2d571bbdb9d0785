"""FedSVD: freeze-A LoRA with the shared ``A`` re-orthogonalised by the server each round (Lee et
al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025,
arXiv:2505.12805; official code ``seanie12/fed-svd``, ``fedmm/fedavg/server.py``).

Rule: every client holds the server's ``A`` frozen and trains only ``B`` (as FFA-LoRA's clients
do), starting from the server's ``(A, B)``; it uploads ``B_k``. The server averages
``B ← Σ_k p_k B_k`` (the code's ``B + Σ_k p_k (B_k − B)``, the same since every client starts
from ``B``), so ``B A = Σ_k p_k B_k A`` exactly. Then, every ``period`` rounds once more than
``warmup`` rounds are done (the code's ``(t + 1) % recalculate_svd_period == 0 and t + 1 >
svd_warmup_steps``), it re-expresses the product in SVD form, ``B A = U S Vᵀ``: ``A ← Vᵀ`` (the
first ``r`` right singular vectors, orthonormal rows) and ``B ← U S``; the product, the global
update, does not change. Clients download both factors and start the next round from them, so
``A`` adapts to what the clients learnt while staying orthonormal, where FFA-LoRA's ``A`` stays
the random ``A_0`` for good. Round 1 starts from PEFT's initialisation shared by every client
(``A`` Kaiming-uniform, ``B = 0``).

As in the paper every client trains the same rank (the server's ``r``). fedlora's SVD is computed
from the factors (QR of ``B`` and ``Aᵀ``, SVD of the ``r × r`` core;
:func:`fedlora.linalg.factored_svd`) instead of the code's dense SVD of ``B A``: the same
factorisation, up to the signs of singular vector pairs, at ``O(r² (d_in + d_out))``. The code
rescales nothing at the SVD (its scaling ``α / r`` multiplies ``B A`` on both sides of it); here
too. ``period = 0`` never re-orthogonalises: FFA-LoRA at equal ranks.

The client side is FFA-LoRA's (:class:`fedlora.methods.ffa.FreezeAClient`): ``A`` frozen, only
``B`` trains, is noised under differential privacy (the paper's point: with ``A`` frozen, DP-SGD's
noise is not amplified by ``A``'s own noise) and travels up.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.errors import ConfigError, UpdateError
from fedlora.linalg import svd_factors, truncate
from fedlora.lora import LoRAFactors, held_frozen
from fedlora.methods.ffa import FreezeAClient
from fedlora.methods.zeropad import zero_padded_mean
from fedlora.schema import method_options
from fedlora.strategies.base import RoundInput, Strategy, Traits, register, server_factors


@method_options("fedsvd")
@dataclass
class FedSVDOptions:
    """FedSVD's server (strategy ``fedsvd``); the official code's flags and defaults."""

    period: int = 1
    """Re-orthogonalise every this many rounds (``--recalculate_svd_period``); 0: never."""
    warmup: int = 0
    """Rounds before the first re-orthogonalisation (``--svd_warmup_steps``, counted in rounds)."""

    def check(self) -> None:
        if self.period < 0:
            raise ConfigError(f"fedsvd.period must be >= 0 (0: never), got {self.period}")
        if self.warmup < 0:
            raise ConfigError(f"fedsvd.warmup must be >= 0, got {self.warmup}")


@register
class FedSVD(Strategy):
    name = "fedsvd"
    client = FreezeAClient
    Options = FedSVDOptions
    options: FedSVDOptions
    traits = Traits(
        paper="Lee et al. 2025 (FedSVD)", mixed_ranks=False, averages=True, exact="always"
    )

    def reorthogonalises(self, rounds_done: int) -> bool:
        """Whether the round that makes ``rounds_done`` rounds re-orthogonalises ``A``."""
        o = self.options
        return o.period > 0 and rounds_done % o.period == 0 and rounds_done > o.warmup

    def _check(self, rnd: RoundInput) -> None:
        for update in rnd.updates:
            for module, f in update.factors.items():
                held = server_factors(rnd, update, module)
                if not held_frozen(f.A, held.A):
                    raise UpdateError(
                        "A differs from the server's A; FedSVD's clients hold A frozen (train B "
                        "only)",
                        client=update.client_id,
                        module=module,
                    )

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        held = rnd.state.factors[module]
        # the mean's A is ignored: A is held
        mean = zero_padded_mean(rnd.updates, rnd.weights, module, rnd.trim)
        averaged = LoRAFactors(A=held.A.to(mean.B.dtype), B=mean.B)
        if not self.reorthogonalises(rnd.state.round + 1):
            return averaged
        return truncate(svd_factors(averaged), held.rank)

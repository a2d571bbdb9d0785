"""FedIT: FedAvg on LoRA factors (Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP 2024).

Rule: ``Ā = Σ p_k A_k`` and ``B̄ = Σ p_k B_k``, separately; clients warm-start from ``(Ā, B̄)``.
Every client must train the same rank. The product is not the mean of the products:
``B̄ Ā ≠ Σ p_k B_k A_k`` in general; :func:`fedit_aggregation_error` measures the gap (the noise
FLoRA removes). The FLoRA reference code's FedIT kept only client 0's adapter times ``p_0``
(a misspelled variable); here every client counts, and a test shows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.errors import ConfigError
from fedlora.linalg import stack
from fedlora.lora import ClientUpdate, LoRAFactors, update_norm
from fedlora.methods.zeropad import ZeroPad, zero_padded_mean
from fedlora.strategies.base import (
    GlobalState,
    RankSpec,
    Start,
    Traits,
    module_rank,
    register,
)
from fedlora.weighting import Weighting, client_weights


@register
class FedIT(ZeroPad):
    """Zero-padding restricted to equal ranks, where padding does nothing."""

    name = "fedit"
    traits = Traits(paper="Zhang et al. 2024 (FedIT)", mixed_ranks=False, averages=True)

    def _start(self, state: GlobalState, spec: RankSpec) -> Start:
        for name, f in state.factors.items():
            if module_rank(spec, name) != f.rank:
                raise ConfigError(
                    f"fedit: a client of rank {module_rank(spec, name)} cannot start from the "
                    f"global rank-{f.rank} adapter of module {name!r}; fedit needs equal ranks"
                )
        return super()._start(state, spec)


def fedit_aggregation_error(
    updates: Sequence[ClientUpdate], weighting: Weighting = "examples"
) -> dict[str, float]:
    """FedIT's aggregation error per module: ``‖B̄ Ā − Σ_k p_k B_k A_k‖_F``.

    Computed from factors (``[B̄, B_1 … B_K] [Ā; −p_1 A_1; …; −p_K A_K]``), never densely.
    Zero for a single client or identical clients; positive for distinct ones.
    """
    ordered = sorted(updates, key=lambda u: u.client_id)
    weights = client_weights(ordered, weighting)
    errors = {}
    for module in ordered[0].factors:
        mean = zero_padded_mean(ordered, weights, module)
        exact = stack([u.factors[module] for u in ordered], [-p for p in weights])
        both = LoRAFactors(A=torch.cat([mean.A, exact.A]), B=torch.cat([mean.B, exact.B], dim=1))
        errors[module] = update_norm(both)
    return errors

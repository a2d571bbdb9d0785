"""RoLoRA: alternating optimisation of LoRA's factors (Chen, Guo, Ju, Yang, "Robust Federated
Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025).

Rule: rounds alternate. In a ``B`` round every client holds the global ``A`` frozen and trains
only ``B``; in an ``A`` round it holds the global ``B`` frozen and trains only ``A``. Since all
clients share the frozen factor, averaging the trained one is exact:
``Σ p_k B_k A = (Σ p_k B_k) A`` and ``Σ p_k B A_k = B (Σ p_k A_k)``, for mixed ranks too (a
rank-``r_k`` client holds the first ``r_k`` components; the mean zero-pads, as FFA-LoRA's does).
The first round trains ``B`` (``B_0 = 0`` would give ``A`` no gradient). The phase follows the
rounds aggregated so far (``state.round``), so a skipped round does not break the alternation,
and reaches the clients as the plan option ``train`` (``"A"`` or ``"B"``); their hook
(:mod:`fedlora.clients.rolora`) trains and sends that factor only. An update whose frozen factor
moved from the global one is rejected, since averaging the other would no longer be exact.

Deviation: the paper alternates within a round (several local epochs of ``B``, then of ``A``)
in one variant and across rounds in another; this is the across-rounds variant, whose
aggregation is exact every round.
"""

from __future__ import annotations

import torch

from fedlora.errors import UpdateError
from fedlora.lora import LoRAFactors
from fedlora.strategies.base import GlobalState, RoundInput, Strategy, Traits, register
from fedlora.strategies.zeropad import zero_padded_mean


def phase(state: GlobalState) -> str:
    """The factor the next round trains: ``B`` after an even number of rounds, else ``A``."""
    return "B" if state.round % 2 == 0 else "A"


@register
class RoLoRA(Strategy):
    name = "rolora"
    traits = Traits(paper="Chen et al. 2025 (RoLoRA)", mixed_ranks=True)

    def client_options(self, state: GlobalState) -> dict[str, bool | int | float | str]:
        return {"train": phase(state)}

    def _check(self, rnd: RoundInput) -> None:
        frozen = "A" if phase(rnd.state) == "B" else "B"
        for update in rnd.updates:
            for module, f in update.factors.items():
                g = rnd.state.factors.get(module)
                if g is None or f.shape != g.shape or f.rank > g.rank:
                    raise UpdateError(
                        f"rank {f.rank} and shape {f.shape} do not fit the global adapter"
                        + ("" if g is None else f" of rank {g.rank} and shape {g.shape}"),
                        client=update.client_id,
                        module=module,
                    )
                got = f.A if frozen == "A" else f.B
                held = g.A[: f.rank] if frozen == "A" else g.B[:, : f.rank]
                tol = 4 * torch.finfo(got.dtype).eps
                scale = float(held.abs().max()) if held.numel() else 0.0
                if not torch.allclose(
                    got.double(), held.to(got.device).double(), rtol=tol, atol=tol * scale
                ):
                    raise UpdateError(
                        f"{frozen} differs from the global {frozen}; this RoLoRA round trains "
                        f"{phase(rnd.state)} only ({frozen} frozen)",
                        client=update.client_id,
                        module=module,
                    )

    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        g = rnd.state.factors[module]
        mean = zero_padded_mean(rnd.updates, rnd.weights, module)
        if phase(rnd.state) == "B":
            B = torch.zeros_like(g.B, dtype=mean.B.dtype)
            B[:, : mean.rank] = mean.B
            return LoRAFactors(A=g.A.to(mean.B.dtype), B=B)
        A = torch.zeros_like(g.A, dtype=mean.A.dtype)
        A[: mean.rank] = mean.A
        return LoRAFactors(A=A, B=g.B.to(mean.A.dtype))

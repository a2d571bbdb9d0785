"""RoLoRA: alternating optimisation of LoRA's factors (Chen, Guo, Ju, Yang, "Robust Federated
Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025).

Rule: rounds alternate. In a ``B`` round every client holds the global ``A`` frozen and trains
only ``B``; in an ``A`` round it holds the global ``B`` frozen and trains only ``A``. Since all
clients share the frozen factor, averaging the trained one is exact:
``Σ p_k B_k A = (Σ p_k B_k) A`` and ``Σ p_k B A_k = B (Σ p_k A_k)``. The first round trains
``B`` (``B_0 = 0`` would give ``A`` no gradient). The phase follows the
rounds aggregated so far (``state.round``), so a skipped round does not break the alternation,
and reaches the clients as the plan option ``train`` (``"A"`` or ``"B"``); their hook
(:class:`AlternatingClient`) trains and sends that factor only. An update whose frozen factor
moved from the global one is rejected, since averaging the other would no longer be exact.

Mixed ranks (fedlora's extension; the paper's clients share one rank): a rank-``r_k`` client
holds the first ``r_k`` components, and each component of the trained factor is averaged over
the clients that hold it (HAFL's rank-1 rule, ``over="present"``); a component no client of
the round holds keeps its global value. So a round in which no client learns anything leaves
the model unchanged, whatever the ranks. (Zero-padding the mean instead, as fedlora did before,
scales component ``i`` by the total weight of the clients whose rank exceeds ``i``: ranks
``[8, 2]`` at equal weights halved components 2–7 in a round where nobody learned.) At equal
ranks the two are the same mean, exact as above; with mixed ranks the result is not
``Σ p_k ΔW_k`` (no rule that keeps the shared frozen factor could be).

Deviation: the paper alternates within a round (several local epochs of ``B``, then of ``A``)
in one variant and across rounds in another; this is the across-rounds variant, whose
aggregation is exact every round at equal ranks. Neither the paper's text nor its code (none
found public) says how rounds are structured beyond that. The default hook freezes the other factor,
privacy noises only the sent one and traffic counts only it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlora.clients.base import ClientHook, Scalar
from fedlora.errors import UpdateError
from fedlora.linalg import indexed_mean
from fedlora.lora import LoRAFactors
from fedlora.strategies.base import GlobalState, RoundInput, Strategy, Traits, register


class AlternatingClient(ClientHook):
    @classmethod
    def sent(cls, options: Mapping[str, Scalar]) -> tuple[str, ...]:
        part = options.get("train")
        if part not in ("A", "B"):
            raise ValueError(f"rolora: the plan option 'train' must be 'A' or 'B', got {part!r}")
        return (str(part),)


def phase(state: GlobalState) -> str:
    """The factor the next round trains: ``B`` after an even number of rounds, else ``A``."""
    return "B" if state.round % 2 == 0 else "A"


@register
class RoLoRA(Strategy):
    name = "rolora"
    client = AlternatingClient
    traits = Traits(paper="Chen et al. 2025 (RoLoRA)", mixed_ranks=True, exact="equal_ranks")

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
        """The trained factor's components, each averaged over the clients holding it (global
        ``A: (r_g, d_in)``, ``B: (d_out, r_g)``; a client holds components ``0 … r_k − 1``)."""
        g = rnd.state.factors[module]
        factors = rnd.factors(module)
        held = [torch.arange(f.rank, device=f.A.device) for f in factors]
        trained = "B" if phase(rnd.state) == "B" else "A"
        dim = 1 if trained == "B" else 0
        values = [f.B if trained == "B" else f.A for f in factors]
        previous = g.B if trained == "B" else g.A
        mean = indexed_mean(
            values, held, rnd.weights, g.rank, dim, over="present", previous=previous
        )
        if trained == "B":
            return LoRAFactors(A=g.A.to(mean.dtype), B=mean)
        return LoRAFactors(A=mean, B=g.B.to(mean.dtype))

"""Importance of LoRA components: smoothed sensitivity (AdaLoRA, Zhang et al. ICLR 2023), as HAFL
(Yan et al. 2024) uses it to decide which rank-1 components a client receives or trains.

For every LoRA parameter ``w`` with gradient ``g``, after each optimizer step's backward pass:

    I = |w ⊙ g|                           sensitivity
    Ī ← β1 Ī + (1 − β1) I                  smoothed sensitivity
    Ū ← β2 Ū + (1 − β2) |I − Ī|            uncertainty (with the updated Ī)
    S = Ī ⊙ Ū                              score

as PEFT's AdaLoRA ``RankAllocator`` does (β1 = β2 = 0.85). Component ``i`` combines its row of
``A: (r, d_in)`` and its column of ``B: (d_out, r)``: ``s_i = mean_j S_A[i, j] + mean_j S_B[j, i]``
(AdaLoRA's combination without its singular-value term, which plain LoRA does not have). HAFL does
not publish its combination; this is the choice, documented in ``docs/algorithms.md``.
Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class SmoothedSensitivity:
    """Running ``Ī`` and ``Ū`` of one tensor (same shape as the parameter)."""

    beta1: float = 0.85
    beta2: float = 0.85
    sensitivity: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None

    def update(self, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """One step: ``I = |w ⊙ g|``, then the two exponential moving averages."""
        current = (weight.detach() * grad.detach()).abs().float()
        if self.sensitivity is None or self.uncertainty is None:
            self.sensitivity = torch.zeros_like(current)
            self.uncertainty = torch.zeros_like(current)
        self.sensitivity.mul_(self.beta1).add_(current, alpha=1 - self.beta1)
        self.uncertainty.mul_(self.beta2).add_(
            (current - self.sensitivity).abs(), alpha=1 - self.beta2
        )

    def score(self) -> torch.Tensor:
        """``S = Ī ⊙ Ū`` (zeros before the first update are not defined: raise)."""
        if self.sensitivity is None or self.uncertainty is None:
            raise RuntimeError("no gradient seen yet: call update() after a backward pass")
        return self.sensitivity * self.uncertainty


def component_scores(score_A: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """``s_i = mean_j S_A[i, j] + mean_j S_B[j, i]`` for ``S_A: (r, d_in)``, ``S_B: (d_out, r)``;
    returns ``(r,)``."""
    return score_A.mean(dim=1) + score_B.mean(dim=0)


@dataclass
class ComponentImportance:
    """Tracks every module's ``A`` and ``B`` and reports an importance per component.

    ``params`` maps a module name to a function returning its current ``(A, B)`` parameters
    (whose ``.grad`` holds the step's gradient). Call :meth:`step` after the backward pass(es) of
    each optimizer step, before the gradients are cleared. A frozen factor (no ``.grad``)
    contributes nothing, so in freeze mode only trained components gain importance.
    """

    params: Mapping[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]
    beta1: float = 0.85
    beta2: float = 0.85
    _trackers: dict[str, tuple[SmoothedSensitivity, SmoothedSensitivity]] = field(
        default_factory=dict
    )

    def step(self) -> None:
        for name, get in self.params.items():
            A, B = get()
            if name not in self._trackers:
                self._trackers[name] = (
                    SmoothedSensitivity(self.beta1, self.beta2),
                    SmoothedSensitivity(self.beta1, self.beta2),
                )
            track_A, track_B = self._trackers[name]
            for tracker, p in ((track_A, A), (track_B, B)):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                tracker.update(p, grad)

    def scores(self) -> dict[str, torch.Tensor]:
        """``{module: (r,)}`` component importance; empty before the first :meth:`step`."""
        return {
            name: component_scores(track_A.score(), track_B.score())
            for name, (track_A, track_B) in self._trackers.items()
        }

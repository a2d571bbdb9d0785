"""Communication accounting: parameters and bytes each client sends and receives per round.

Counts are of the numbers that must travel: LoRA factors ``r (d_in + d_out)`` per module, only
``B`` (``r d_out``) for FFA-LoRA whose ``A_0`` every party derives from the shared seed, and
FLoRA's stacked update ``R (d_in + d_out)`` (or ``d_out d_in`` when dense) that every client
downloads to merge into its base weights. The ratio is against full fine-tuning, which sends the
whole model each way: ``(up + down) / (2 · model parameters)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedlora.lora import BaseDelta, LoRAFactors

BYTES_PER_PARAM = 4
"""Every number travels as float32."""


def factor_params(
    factors: Mapping[str, LoRAFactors] | None, parts: Sequence[str] = ("A", "B")
) -> int:
    """Numbers in the ``parts`` (``A`` and/or ``B``) of ``factors``: ``Σ r (d_in + d_out)`` for
    both, ``Σ r d_out`` for ``B`` alone."""
    if not factors:
        return 0
    return sum(
        (f.A.numel() if "A" in parts else 0) + (f.B.numel() if "B" in parts else 0)
        for f in factors.values()
    )


def delta_params(deltas: Mapping[str, BaseDelta] | None) -> int:
    """Numbers in base deltas, factored or dense."""
    if not deltas:
        return 0
    return sum(
        d.A.numel() + d.B.numel() if isinstance(d, LoRAFactors) else d.numel()
        for d in deltas.values()
    )


@dataclass(frozen=True)
class Traffic:
    """One client's traffic in one round."""

    client: str
    rank: int
    up_params: int
    down_params: int
    bytes_per_param: int
    model_params: int

    @property
    def up_bytes(self) -> int:
        return self.up_params * self.bytes_per_param

    @property
    def down_bytes(self) -> int:
        return self.down_params * self.bytes_per_param

    @property
    def ratio_to_full(self) -> float:
        return (self.up_params + self.down_params) / (2 * self.model_params)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            up_bytes=self.up_bytes, down_bytes=self.down_bytes, ratio_to_full=self.ratio_to_full
        )
        return out

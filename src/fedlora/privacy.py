"""Client-level differential privacy: clip a client's update, add Gaussian noise, account ε.

A client's update is everything it trained, minus where it started: ``A - A_start`` and
``B - B_start`` for every module (``B`` only when ``A`` is frozen, as in FFA-LoRA). It is scaled
to an L2 norm of at most ``C`` (Flower's FlatClip, ``clip_inputs_inplace``: one norm over all
tensors) and every entry gets ``N(0, (σC)²)`` noise before it leaves the client. Whatever the
server does with it afterwards (stacking, averaging, SVD, merging) is post-processing, so the
guarantee holds for every strategy and both engines (a private client sends nothing else
computed from its data: not its training loss, not its example count, :func:`withholds`): each
upload is a Gaussian mechanism of noise multiplier σ with respect to the client's data
(sensitivity ``C``, the client's update against an absent one). Over ``n`` uploads the
client's ε is composed with Flower's ``RdpAccountant`` (Google's ``dp-accounting``), without
amplification by sampling (the server knows who it sampled).

Why not Flower's ``LocalDpMod`` or ``fixedclipping_mod`` themselves: they need a message with
exactly one ``ArrayRecord`` whose keys equal the reply's, and take the update against that
record. fedlora's train message also carries the plan, frozen components and the merged base
updates a node missed, and a FLoRA client starts from a fresh seeded adapter the server never
sends, so a mod cannot see where the client started. The same clipping and noise run inside the
client's training step instead (:meth:`fedlora.rounds.PartyModel.train`), on both engines. The
noise is drawn from a ``torch.Generator`` seeded from the OS's entropy, not from NumPy's global
generator as in Flower's ``add_gaussian_noise_inplace``: fedlora seeds that one from the
run's seed, which the server knows.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.config import PrivacyConfig
from fedlora.devices import host_generator
from fedlora.lora import LoRAFactors
from fedlora.seeds import derive_seed


def withholds(cfg: PrivacyConfig) -> bool:
    """Whether a client under ``cfg`` keeps its training loss and its example count to itself:
    with privacy on, neither is covered by the noise, so neither leaves it. The server weighs
    such a client by the count it fixed when the client joined: the size of the partition it
    made for the client's slot (in-process, and for a Flower node, which sends no count)."""
    return cfg.clip_norm > 0


def noise_generator(cfg: PrivacyConfig, *parts: int) -> torch.Generator:
    """The generator for one upload's noise: from the OS's entropy, or from
    ``cfg.noise_seed`` and ``parts`` (reproducible, and so no protection against whoever knows
    the seed)."""
    seed = secrets.randbits(63) if cfg.noise_seed is None else derive_seed(cfg.noise_seed, *parts)
    return host_generator(seed)


def privatize(
    start: Mapping[str, LoRAFactors],
    trained: Mapping[str, LoRAFactors],
    cfg: PrivacyConfig,
    generator: torch.Generator,
    sent: Sequence[str] = ("A", "B"),
) -> tuple[dict[str, LoRAFactors], float]:
    """``trained`` with its update against ``start`` clipped to ``cfg.clip_norm`` and noised
    (``N(0, (σC)²)`` per entry); also the update's norm before clipping. Only the factors in
    ``sent`` (``A`` and/or ``B``) are the update; the others are returned as trained (frozen,
    untouched, and not sent)."""
    updates: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    total = 0.0
    for name, f in trained.items():
        s = start[name]
        if s.shape != f.shape or s.rank != f.rank:
            raise ValueError(
                f"module {name!r}: trained factors of rank {f.rank} and shape {f.shape} do not "
                f"match their start (rank {s.rank}, shape {s.shape})"
            )
        dA = f.A.double() - s.A.double() if "A" in sent else None  # exact: float32 in float64
        dB = f.B.double() - s.B.double() if "B" in sent else None
        total += sum(float(d.square().sum()) for d in (dA, dB) if d is not None)
        updates[name] = (dA, dB)
    norm = math.sqrt(total)
    clip = min(1.0, cfg.clip_norm / norm) if norm > 0 else 1.0
    std = cfg.noise_multiplier * cfg.clip_norm
    out = {}
    for name, (dA, dB) in updates.items():
        s, f = start[name], trained[name]
        A = f.A if dA is None else (s.A.double() + _noised(dA * clip, std, generator))
        B = f.B if dB is None else (s.B.double() + _noised(dB * clip, std, generator))
        out[name] = LoRAFactors(A=A.to(f.A.dtype), B=B.to(f.B.dtype))
    return out, norm


def _noised(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    if std == 0:
        return x
    # drawn where the generator is (the host: the same numbers on every machine), then moved
    draw = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return x + std * draw.to(x.device)


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, uploads: int, delta: float) -> float:
    """A client's ε at ``delta`` after ``uploads`` Gaussian releases of ``noise_multiplier``
    (Rényi DP, Flower's ``RdpAccountant``, no amplification by sampling); ``inf`` without
    noise, 0 before any upload."""
    if uploads == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        RdpAccountant,
        SamplingMethod,
    )
    from flwr.serverapp import PrivacyConfig as FlowerPrivacy

    accountant = RdpAccountant(
        FlowerPrivacy(
            target_delta=delta,
            population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), uploads)
    return accountant.get_epsilon(delta)


def privacy_summary(cfg: PrivacyConfig, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's privacy facts from its per-round rows: the settings, each client's uploads and
    ε, and the largest ε (None without noise: clipping alone guarantees nothing)."""
    uploads: dict[str, int] = {}
    for row in rows:
        for cid in row.get("clients", []):
            uploads[cid] = uploads.get(cid, 0) + 1
    noised = cfg.noise_multiplier > 0
    eps = {cid: epsilon(cfg.noise_multiplier, n, cfg.delta) for cid, n in uploads.items()}
    return {
        "clip_norm": cfg.clip_norm,
        "noise_multiplier": cfg.noise_multiplier,
        "delta": cfg.delta,
        "uploads": uploads,
        "epsilon": eps if noised else None,
        "epsilon_max": max(eps.values(), default=0.0) if noised else None,
        "accounting": "RDP (Flower RdpAccountant), per client, no amplification by sampling",
        "withheld": ["training loss", "example count"],
        "withheld_why": (
            "not covered by the noise, so a private client does not send them; the server "
            "weighs it by the size of the partition it made for the client's slot"
        ),
    }

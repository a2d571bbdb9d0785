"""A client's side of a round around any training loop.

:func:`open_adapters` runs before the loop: each client's adapter attached the method's way
(:meth:`fedlora.clients.ClientHook.attach`, fedlora's seeded initialisation), the plan's start
and frozen components loaded, activation checkpointing where the run asks, what does not train
frozen (:meth:`fedlora.clients.ClientHook.prepare`, whose callbacks the loop calls). After the
loop each hook reads its upload while the adapter is attached, the caller detaches, and
:func:`finish_upload` applies client-level privacy to what travels and the hook's last word.

fedlora's own loop runs between them in :meth:`fedlora.rounds.PartyModel.train_together`; a Flower
user's own trainer does in :mod:`fedlora.flower.client_side`. One sequence, so both send what the
method defines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedlora import adapters, privacy
from fedlora.clients import Callbacks, ClientHook, Session, Upload
from fedlora.lora import LoRAFactors
from fedlora.methods import hook_for

log = logging.getLogger("fedlora")


@dataclass(frozen=True)
class Opened:
    """What :func:`open_adapters` made: the model with every session's adapter, and per
    session its hook, the callbacks its training calls and, where privacy clips, the factors
    it started from."""

    model: Any
    hooks: list[ClientHook]
    callbacks: list[Callbacks]
    befores: list[dict[str, LoRAFactors] | None]


def open_adapters(model: Any, sessions: Sequence[Session], together: bool = False) -> Opened:
    """Attach one adapter per session to ``model`` (one session, or several that train
    together: ``together``), each with its plan's start and frozen components, and prepare them
    for training. On failure, whatever was attached is detached again."""
    hooks = [hook_for(s.cfg.strategy)(s) for s in sessions]
    cfg = sessions[0].cfg
    bare = model
    try:
        for session, hook in zip(sessions, hooks, strict=True):
            model = hook.attach(model)
            if session.plan.start:
                adapters.write_factors(model, session.plan.start, session.adapter)
            if session.plan.frozen:
                adapters.add_frozen(model, session.plan.frozen)
        if cfg.model.gradient_checkpointing:
            adapters.checkpoint_activations(model)
        if together:
            adapters.train_adapters(model, [s.adapter for s in sessions])
        callbacks = [hook.prepare(model) for hook in hooks]
        if together and any(c != Callbacks() for c in callbacks):
            raise ValueError(
                f"{cfg.strategy}'s client hook says it fuses but returns callbacks, which "
                "only one-at-a-time training calls; set its fuses = False"
            )
        private = cfg.privacy.clip_norm > 0
        befores = [adapters.read_factors(model, s.adapter) if private else None for s in sessions]
    except BaseException:
        if model is not bare:
            adapters.detach(model)
        raise
    return Opened(model, hooks, callbacks, befores)


def finish_upload(
    hook: ClientHook, upload: Upload, before: dict[str, LoRAFactors] | None, index: int
) -> Upload:
    """``upload`` (read by ``hook`` from its trained adapter, now detached) as it leaves client
    ``index``: where privacy clips (``before``: the factors it started from), its update clipped
    and noised on the factors that travel (:func:`fedlora.privacy.privatize`) before anything
    else reads them; then the hook's :meth:`fedlora.clients.ClientHook.finish`."""
    s = hook.session
    if before is not None:
        noise = privacy.noise_generator(s.cfg.privacy, s.round, index)
        sent = hook.sent(s.plan.options)
        factors, norm = privacy.privatize(before, upload.factors, s.cfg.privacy, noise, sent)
        upload = replace(upload, factors=factors)
        log.debug(
            "round %d: client %d's update norm %.4g, clip norm %g",
            s.round,
            index,
            norm,
            s.cfg.privacy.clip_norm,
        )
    return hook.finish(upload)

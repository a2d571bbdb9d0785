"""The client half of a method: what one client does around its local training.

A method is one file of :mod:`fedlora.methods`: its strategy (a
:class:`fedlora.strategies.Strategy`, pure math), its options (a dataclass registered with
:func:`fedlora.schema.method_options`) and, where its clients do more than train a plain LoRA
from the start the server sends, a client hook: a :class:`ClientHook` subclass that the strategy
names as its ``client``. :meth:`fedlora.rounds.PartyModel.train` runs
the same steps for every method and asks the hook at each of them:

1. :meth:`ClientHook.attach`: wrap the base model in a fresh adapter of the plan's rank (PEFT's
   LoRA; AdaLoRA's hook attaches PEFT's AdaLoRA). The runner then loads the plan's start and
   frozen components.
2. :meth:`ClientHook.prepare`: freeze parameters, set up trackers; returns the
   :class:`Callbacks` local training calls (a loss penalty, an action per step, one after it).
3. :meth:`ClientHook.read`: what the trained adapter uploads (factors, kept ranks, importance),
   while it is still attached.
4. The runner applies client-level privacy to the factors of :meth:`ClientHook.sent` (the
   parts that travel), detaches, then :meth:`ClientHook.finish` may change the upload once more
   (HetLoRA's self-pruning).

The server side of a round gives a hook options through the plan (:attr:`LocalPlan.options`,
from :meth:`fedlora.strategies.Strategy.client_options`), as Flower's ``FedProx`` puts its
``proximal_mu`` into the train config; anything else a hook needs comes from the run config,
which every client holds. The hook is PEFT's ``LoraVariant`` idea one level up: the variant
changes a method's client steps, the runner keeps their order.

PEFT is imported only where a hook touches the model (:mod:`fedlora.adapters`), so that reading
a config, which registers every method's options, stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias

import torch

from fedlora.comm import factor_params
from fedlora.lora import ADAPTER, LoRAFactors
from fedlora.strategies.base import Start

if TYPE_CHECKING:
    from fedlora.config import RunConfig

Scalar: TypeAlias = bool | int | float | str
"""A plan option's value (what a Flower ``ConfigRecord`` carries)."""

PARTS = ("A", "B")


@dataclass(frozen=True)
class LocalPlan:
    """What one client does in a round, as the server sends it."""

    rank: int
    start: Start = None
    frozen: Start = None
    """Components held in the forward pass but not trained (hafl-freeze)."""
    options: Mapping[str, Scalar] = field(default_factory=dict)
    """The method's client options for this round (:meth:`Strategy.client_options`)."""
    score: bool = False
    """Score the client's own trained model on the held-out set (a hook that keeps client
    state: FedSA-LoRA's personalised model), where the client holds one (in-process)."""


class ClientState(Protocol):
    """What one client keeps across rounds (:attr:`ClientHook.keeps_state`): in-process a file
    per client and round under the run folder, so a resumed run finds it as it was at the
    checkpoint; on a Flower node its ``context.state``."""

    def load(self) -> dict[str, LoRAFactors] | None:
        """What the client saved last; None: nothing yet."""

    def save(self, factors: dict[str, LoRAFactors]) -> None:
        """Keep ``factors`` for the client's next round."""


@dataclass(frozen=True)
class Session:
    """One client's local training in one round, as its hook sees it."""

    cfg: RunConfig
    plan: LocalPlan
    round: int
    alpha: float
    seed: int
    """Seeds the adapter's initialisation (and, in the runner, the batches)."""
    steps: int
    """Optimizer steps this training will take."""
    modules: tuple[str, ...]
    """The target modules' full names."""
    state: ClientState | None = None
    """This client's own state across rounds, for a hook that :attr:`ClientHook.keeps_state`."""
    adapter: str = ADAPTER
    """The name of this client's PEFT adapter: its own where clients train fused
    (:attr:`ClientHook.fuses`), beside the others on one model."""


@dataclass(frozen=True)
class Callbacks:
    """What local training calls (:func:`fedlora.train.train_local`); None: nothing."""

    penalty: Callable[[], torch.Tensor] | None = None
    """Added to every micro-batch's loss; the reported loss is the model's alone."""
    on_step: Callable[[], None] | None = None
    """After each step's backward passes, while the gradients are there."""
    after_step: Callable[[int], None] | None = None
    """After each optimizer step, with its index, before the gradients are cleared."""


@dataclass(frozen=True)
class Upload:
    """What a client's training gives the server."""

    factors: dict[str, LoRAFactors]
    kept: dict[str, int]
    """Components per module that carry the update (fewer than planned after pruning)."""
    importance: dict[str, torch.Tensor] | None = None
    next_rank: int | None = None
    """The rank this client trains from the next round on (None: unchanged)."""


class ClientHook:
    """The default client: a fresh PEFT LoRA of the plan's rank (``A`` random from the session's
    seed, ``B`` zero), the plan's start loaded into its first components, every factor trained
    and sent."""

    shrinks_rank: ClassVar[bool] = False
    """Results may carry fewer components than planned; rounds record the rank sums."""
    also_sends: ClassVar[str | None] = None
    """What else a reply carries that is computed from the client's data (privacy's noise does
    not cover it, so ``[privacy]`` refuses the method); None: factors only."""
    keeps_state: ClassVar[bool] = False
    """The client keeps part of its adapter across rounds (:attr:`Session.state`); the runner
    provides the state and scores the client's own model (``personal_*`` metrics)."""
    fuses: ClassVar[bool] = True
    """Its clients may train together, each its own adapter on one model
    (:func:`fedlora.train.train_fused`): its :meth:`attach`, :meth:`prepare` and :meth:`read`
    act on :attr:`Session.adapter` only, and :meth:`prepare` returns no callbacks. A hook that
    overrides any of the three with more than that sets it False (the runner then trains its
    clients one at a time)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @classmethod
    def sent(cls, options: Mapping[str, Scalar]) -> tuple[str, ...]:
        """The factors that train and travel up, ``A`` and/or ``B``, for a plan's ``options``;
        the others stay as they started (and are not counted as traffic)."""
        del options
        return PARTS

    @classmethod
    def upload_params(cls, factors: Mapping[str, LoRAFactors], plan: LocalPlan) -> int:
        """What a reply's ``factors`` cost on the wire, in numbers (traffic accounting, on the
        server, which knows the ``plan`` it sent): the factors of :meth:`sent`, dense. A hook
        whose clients encode their upload (a sparse delta from the plan's start) counts its
        own."""
        return factor_params(factors, cls.sent(plan.options))

    @classmethod
    def received(cls, options: Mapping[str, Scalar]) -> tuple[str, ...] | None:
        """The factors of the plan's start that travel down, ``A`` and/or ``B``; None: what the
        strategy's traits imply (both, or ``B`` alone with a fixed ``A``)."""
        del options
        return None

    def attach(self, model: Any) -> Any:
        from fedlora import adapters

        s = self.session
        return adapters.attach(
            model, s.cfg.model.targets, s.plan.rank, s.alpha, seed=s.seed, adapter=s.adapter
        )

    def prepare(self, peft_model: Any) -> Callbacks:
        """Freeze what does not train (the factors outside :meth:`sent`)."""
        from fedlora import adapters

        for part in PARTS:
            if part not in self.sent(self.session.plan.options):
                adapters.freeze(peft_model, part, self.session.adapter)
        return Callbacks()

    def read(self, peft_model: Any) -> Upload:
        from fedlora import adapters

        adapter = self.session.adapter
        return Upload(
            adapters.read_factors(peft_model, adapter), adapters.kept_ranks(peft_model, adapter)
        )

    def finish(self, upload: Upload) -> Upload:
        """The upload after privacy's noise, detached from the model."""
        return upload

"""The strategy interface, the global state it transforms, and the registry of strategies by name.

A strategy is pure math: tensors in, tensors out, no I/O, no peft / transformers / flwr. It
declares what it needs in :class:`Traits`, and the runner (in-process or Flower) acts on that:
merge ``base_delta`` into the base weights, give clients fresh adapters, and so on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias, TypeVar

import torch

from fedlora.errors import ConfigError, UpdateError
from fedlora.linalg import truncate
from fedlora.lora import BaseDelta, ClientUpdate, LoRAFactors, dense_delta, validate_updates
from fedlora.weighting import Weighting, client_weights

RankSpec: TypeAlias = int | Mapping[str, int]
"""A client's LoRA rank: one for every module, or one per module name."""

Start: TypeAlias = dict[str, LoRAFactors] | None
"""What a client starts a round from: factors per module of rank ``<= r_k`` (the adapter boundary
initialises any further components freshly: ``A`` random, ``B`` zero), or ``None`` for a fresh
adapter."""


@dataclass(frozen=True)
class Traits:
    """What a strategy needs from the runner. What its clients do differently is its client
    hook's (:mod:`fedlora.clients`)."""

    paper: str
    """The method's source, cited in docs and tables."""
    mixed_ranks: bool
    """Clients may train different ranks in the same round."""
    merges_into_base: bool = False
    """Each round's ``base_delta`` is merged into the frozen base weights (FLoRA)."""
    fresh_client_adapters: bool = False
    """Clients start every round from a fresh adapter rather than from the global one."""
    fixed_a: bool = False
    """``A`` stays at the shared init of :meth:`Strategy.init_state`; only ``B`` trains."""
    component_level: bool = False
    """Aggregates per rank-1 component and honours :attr:`ClientUpdate.component_index`."""
    downloads_global_rank: bool = False
    """Every client receives all ``r_g`` components of the global adapter, not the first ``r_k``
    (hafl-freeze: the components it does not train travel too, frozen): what traffic accounting
    (``fedlora bench comm``) counts for its download."""
    projects: bool = False
    """One factor carries a round's update and the other is held (FedSRD): the global update is
    the clients' aggregate projected onto the held factor's span, so even a single client's update
    is not reproduced. The invariant tests hold such a method to that (and every other method to
    reproducing a single client)."""
    averages: bool = False
    """The rule is a weighted mean of the clients' tensors of one shape (their factors, zero-
    padded to one rank, or their ``ΔW_k``), which ``validation.trim`` may replace by a
    coordinate-wise trimmed mean (:func:`fedlora.linalg.trimmed_mean`). Not FLoRA's stacking or
    the methods built on it: their update is an exact sum, and a trimmed sum of products is no
    longer low rank."""
    exact: Literal["always", "equal_ranks", "no"] = "no"
    """Whether one round's global update equals ``Σ p_k ΔW_k`` of the clients' updates: for any
    ranks (``always``), when the clients share one rank (``equal_ranks``), or not (``no``: the
    factors are averaged, or the sum is truncated; see :meth:`Strategy.error_bound`). The
    invariant tests hold every method to what it declares here, both ways."""


@dataclass(frozen=True)
class GlobalState:
    """The server's state between rounds.

    ``factors``: the global adapter per module (what clients start from, by truncation).
    ``base_delta``: the round's update to merge into the base weights (FLoRA), factored
    ``B @ A`` where that is smaller than dense. ``round``: rounds aggregated so far.
    ``importance``: the server's aggregated importance per component ``(r_g,)`` (HAFL).
    """

    factors: Mapping[str, LoRAFactors] = field(default_factory=dict)
    base_delta: Mapping[str, BaseDelta] = field(default_factory=dict)
    round: int = 0
    importance: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def global_delta(self, module: str) -> torch.Tensor:
        """The dense update this round's state applies to ``module``: the merged base delta
        and the global adapter, either or both (for tests and evaluation only)."""
        parts = []
        if module in self.base_delta:
            parts.append(dense_delta(self.base_delta[module]))
        if module in self.factors:
            parts.append(self.factors[module].delta())
        if not parts:
            raise KeyError(module)
        return sum(parts[1:], parts[0])


@dataclass(frozen=True)
class RoundInput:
    """One round's validated input: ``updates`` sorted by client id, ``weights`` their ``p_k``,
    ``trim`` the fraction a method that averages (:attr:`Traits.averages`) trims at each end
    of every coordinate (0: its own weighted mean)."""

    state: GlobalState
    updates: Sequence[ClientUpdate]
    weights: Sequence[float]
    trim: float = 0.0

    @property
    def modules(self) -> list[str]:
        return list(self.updates[0].factors)

    def factors(self, module: str) -> list[LoRAFactors]:
        return [u.factors[module] for u in self.updates]


class Strategy(ABC):
    """Base of every aggregation strategy. Subclasses implement :meth:`_combine`.

    :meth:`aggregate` sorts the updates by client id (so the result is bitwise independent of
    arrival order), validates them all before any math (so a bad update changes nothing), then
    computes the weights ``p_k`` and delegates.
    """

    name: ClassVar[str]
    traits: ClassVar[Traits]
    Options: ClassVar[type[Any] | None] = None
    """The dataclass of the strategy's own config section (registered with
    :func:`fedlora.schema.method_options`), passed to the constructor as ``options`` (default:
    the dataclass's defaults) and checked there by its ``check()``, if it has one; None: the
    strategy takes no options. A subclass annotates ``options: ItsOptions``."""
    options: Any
    client: ClassVar[type[Any] | None] = None
    """The method's client hook (a :class:`fedlora.clients.base.ClientHook` subclass in the same
    file), where its clients do more than train a plain LoRA; None: the default hook."""

    def __init__(
        self, weighting: Weighting = "examples", options: Any = None, trim: float = 0.0
    ) -> None:
        self.weighting = weighting
        if options is None and self.Options is not None:
            options = self.Options()
        if options is not None and hasattr(options, "check"):
            options.check()
        self.options = options
        check_trim(trim, self.name, self.traits)
        self.trim = trim

    def init_state(
        self, shapes: Mapping[str, tuple[int, int]], rank: int, generator: torch.Generator
    ) -> GlobalState:
        """The state before round 1, for modules ``{name: (d_out, d_in)}`` and the largest client
        rank: one shared initialisation (:func:`shared_init`) that every client starts from, as
        the reference code's clients all load the server's one initial adapter. Empty for
        strategies whose clients start from fresh adapters each round."""
        if self.traits.fresh_client_adapters:
            return GlobalState()
        return GlobalState(factors=shared_init(shapes, rank, generator))

    def error_bound(self) -> float | None:
        """For a method whose round truncates the exact sum (:attr:`Traits.exact` ``no``): the
        bound it guarantees on ``‖ΔW − Σ p_k ΔW_k‖_F / ‖Σ p_k ΔW_k‖_F`` per module; None: no
        bound (or exact)."""
        return None

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        """Combine one round's client updates into the next global state."""
        ordered = sorted(updates, key=lambda u: u.client_id)
        validate_updates(ordered)
        if not self.traits.mixed_ranks:
            _require_equal_ranks(self.name, ordered)
        rnd = RoundInput(state, ordered, client_weights(ordered, self.weighting), self.trim)
        self._check(rnd)
        return self._aggregate(rnd)

    def _check(self, rnd: RoundInput) -> None:
        """Strategy-specific validation before any math; raise :class:`UpdateError`."""
        del rnd

    def _aggregate(self, rnd: RoundInput) -> GlobalState:
        """Default: the new global adapter is :meth:`_combine` of each module."""
        factors = {m: self._combine(rnd, m) for m in rnd.modules}
        return GlobalState(factors=factors, round=rnd.state.round + 1)

    @abstractmethod
    def _combine(self, rnd: RoundInput, module: str) -> LoRAFactors:
        """The rule for one module: validated updates and weights ``p_k`` in, factors out."""

    def redistribute(self, state: GlobalState, ranks: Sequence[RankSpec]) -> list[Start]:
        """What each client, given by its rank, starts the next round from, in the same order.

        Each distinct rank is computed once; clients of equal rank share the same tensors.
        """
        cache: dict[tuple[Any, ...], Start] = {}
        starts = []
        for spec in ranks:
            key = _rank_key(spec)
            if key not in cache:
                cache[key] = self._start(state, spec)
            starts.append(cache[key])
        return starts

    def component_indices(
        self, state: GlobalState, spec: RankSpec
    ) -> dict[str, torch.Tensor] | None:
        """The global component index of each of a rank-``spec`` client's components, per module
        (what its update's ``component_index`` must say); None: the first ``r_k``."""
        del state, spec
        return None

    def client_options(self, state: GlobalState) -> dict[str, bool | int | float | str]:
        """Options for the method's client hook in the next round, the same for every client
        (they travel in each plan, as Flower's FedProx sends its ``proximal_mu``)."""
        del state
        return {}

    def frozen_components(self, state: GlobalState, spec: RankSpec) -> Start:
        """Components a rank-``spec`` client holds in its forward pass but does not train (HAFL's
        freezing mode), per module; None: it holds only what it trains."""
        del state, spec
        return None

    def _start(self, state: GlobalState, spec: RankSpec) -> Start:
        """Default: the first ``min(r_k, r_g)`` components of the global adapter (truncation)."""
        if self.traits.fresh_client_adapters or not state.factors:
            return None
        return {
            name: truncate(f, min(module_rank(spec, name), f.rank))
            for name, f in state.factors.items()
        }


def shared_init(
    shapes: Mapping[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> dict[str, LoRAFactors]:
    """``A_0 ~ U(−1/√d_in, 1/√d_in)`` (PEFT's default LoRA ``A`` init) and ``B_0 = 0`` per module,
    drawn from ``generator`` in sorted module order so every party derives the same ``A_0``."""
    factors = {}
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        bound = 1.0 / d_in**0.5
        # drawn on the generator's device (the host: the same A_0 for every party)
        A = (torch.rand(rank, d_in, generator=generator, device=generator.device) * 2 - 1) * bound
        factors[name] = LoRAFactors(A=A, B=A.new_zeros(d_out, rank))
    return factors


def server_factors(rnd: RoundInput, update: ClientUpdate, module: str) -> LoRAFactors:
    """The server's factors of ``module``, which ``update``'s must fit exactly (shape and rank:
    a method whose every client trains the server's own adapter); an :class:`UpdateError`
    naming the client and module where they do not."""
    held = rnd.state.factors.get(module)
    f = update.factors[module]
    if held is None or f.shape != held.shape or f.rank != held.rank:
        raise UpdateError(
            "does not fit the server's adapter (build the state with init_state(); "
            "every client trains the server's rank)",
            client=update.client_id,
            module=module,
        )
    return held


def module_rank(spec: RankSpec, module: str) -> int:
    """The rank ``spec`` gives ``module``; a clear error when it names none or a bad value."""
    if isinstance(spec, Mapping):
        if module not in spec:
            raise ConfigError(
                f"no rank given for module {module!r}; ranks given for {sorted(spec)}"
            )
        rank = spec[module]
    else:
        rank = spec
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank for module {module!r} must be an int >= 1, got {rank!r}")
    return rank


def _rank_key(spec: RankSpec) -> tuple[Any, ...]:
    return tuple(sorted(spec.items())) if isinstance(spec, Mapping) else (spec,)


def _require_equal_ranks(name: str, updates: Sequence[ClientUpdate]) -> None:
    first = updates[0]
    for update in updates[1:]:
        for module, f in update.factors.items():
            if f.rank != first.factors[module].rank:
                raise UpdateError(
                    f"rank {f.rank} differs from client {first.client_id!r}'s rank "
                    f"{first.factors[module].rank}; {name!r} needs every client at the same rank "
                    "(use flora, flexlora, zeropad, hetlora, hafl or ffa for mixed ranks)",
                    client=update.client_id,
                    module=module,
                )


REGISTRY: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def check_trim(trim: float, name: str, traits: Traits | None) -> None:
    """``validation.trim`` is in ``[0, 0.5]`` and, when set, taken by strategy ``name`` only if
    it averages (``traits``; None: no federated strategy runs, nothing to check)."""
    if trim and traits is not None and not traits.averages:
        taking = sorted(n for n, c in REGISTRY.items() if c.traits.averages)
        raise ConfigError(
            f"validation.trim: strategy {name!r} does not average the clients' tensors (its "
            "update is an exact sum, a projection or a per-component rule), so it has no "
            f"trimmed mean; the strategies that average: {', '.join(taking)}; {name!r} has "
            "validation.norm_ratio"
        )
    if not 0 <= trim <= 0.5:
        raise ConfigError(f"validation.trim must be in [0, 0.5], got {trim}")


def register(cls: S) -> S:
    """Class decorator: make a strategy selectable by its ``name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"strategy name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy registered as ``name``, built with ``options`` (e.g. ``weighting``); the
    methods register when :mod:`fedlora.methods` is imported, which is where callers take this
    function from."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(sorted(REGISTRY))}")
    factory: Callable[..., Strategy] = REGISTRY[name]
    return factory(**options)

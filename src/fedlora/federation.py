"""Building a federation from the config, the same for both engines: the model, every client's
data, ranks and α, the held-out and benchmark sets, the strategy with its options, and the
server's side of the rounds (:class:`fedlora.rounds.FederatedRounds`) on its model.

The in-process runner (:mod:`fedlora.simulation`) and Flower's ServerApp (:mod:`fedlora.flower`)
both build from here and both drive the rounds with :meth:`FederatedRounds.drive`; they differ
only in how a round's plans reach the clients (``execute``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora import adapters
from fedlora.config import RunConfig, check, options_of
from fedlora.data import Example, TaskKind, load_examples, partition, split_heldout
from fedlora.errors import ConfigError
from fedlora.methods import REGISTRY, get_strategy
from fedlora.models import LoadedModel, load_configured
from fedlora.ranks import client_ranks
from fedlora.rounds import Client, ClientInfo, EvalSet, FederatedRounds, PartyModel
from fedlora.strategies import Strategy
from fedlora.weighting import client_id, configured_weighting

VALIDATION = "validation"
"""The metric prefix of the validation split (``data.validation``): ``validation_loss``, …"""
UNSEEN = "unseen"
"""The metric prefix of the held-out categories (``data.heldout_categories``)."""


@dataclass
class Federation:
    """Everything a run needs, built once from the config."""

    cfg: RunConfig
    loaded: LoadedModel
    kind: TaskKind
    clients: list[Client]
    heldout: list[Example]
    shapes: dict[str, tuple[int, int]]
    model_params: int
    scored: list[EvalSet]
    """The sets scored beside ``heldout`` from the data config (validation, held-out
    categories)."""


def build_federation(cfg: RunConfig) -> Federation:
    """Load model and data, split held-out data, partition clients and assign ranks."""
    check(cfg)
    loaded = load_configured(cfg.model, cfg.seed)
    data = federation_data(cfg)
    ranks = client_ranks(cfg.clients.ranks, cfg.clients.num_clients, cfg.clients.rank_set, cfg.seed)
    clients = [
        Client(client_id(k), k, r, cfg.clients.alpha_for(r), list(part))
        for k, (r, part) in enumerate(zip(ranks, data.parts, strict=True))
    ]
    shapes = adapters.target_shapes(loaded.model, cfg.model.targets)
    check_client_ranks(clients, shapes)
    params = sum(p.numel() for p in loaded.model.parameters())
    return Federation(cfg, loaded, data.kind, clients, data.heldout, shapes, params, data.scored)


@dataclass(frozen=True)
class FederationData:
    """The examples of a federation, the same on every party for the same config and seed."""

    parts: list[list[Example]]
    """Every client's training examples."""
    heldout: list[Example]
    """What runs are scored on: the test split, or the validation split with
    ``eval.split = "validation"``."""
    kind: TaskKind
    scored: list[EvalSet]
    """Scored beside ``heldout``: the validation split (``validation_*`` metrics, when it is not
    ``heldout`` itself) and the held-out categories (``unseen_*``)."""


def federation_data(cfg: RunConfig) -> FederationData:
    """Every client's training examples and the sets a run is scored on.

    The held-out categories (``data.heldout_categories``) leave first, whole; then the test split
    (``data.heldout``) comes off, then the validation split (``data.validation``) off the rest;
    clients train on none of them. A run scores the test split and, beside it, the validation
    split as ``validation_*`` (what a study's lr tuning chooses by, so the tuned runs are the
    same runs as the seeds' ones) and the held-out categories as ``unseen_*`` (up to
    ``data.heldout`` of their examples, seeded). ``eval.split = "validation"`` scores the
    validation split alone in the test split's place.
    """
    examples, kind = _source_examples(cfg)
    examples, unseen = split_categories(examples, cfg.data.heldout_categories, cfg.seed)
    train, heldout = split_heldout(examples, cfg.data.heldout, seed=cfg.seed)
    scored = []
    if cfg.data.validation:
        train, validation = split_heldout(train, cfg.data.validation, seed=cfg.seed + 1)
        if cfg.eval.split == "validation":
            heldout = validation
        else:
            scored.append(EvalSet(VALIDATION, validation, kind, rouge=True))
    if unseen:
        if len(unseen) > cfg.data.heldout:
            picked = sorted(random.Random(cfg.seed).sample(range(len(unseen)), cfg.data.heldout))
            unseen = [unseen[i] for i in picked]
        scored.append(EvalSet(UNSEEN, unseen, kind, rouge=True))
    parts = partition(
        train,
        cfg.clients.num_clients,
        cfg.data.partition,
        alpha=cfg.data.dirichlet_alpha,
        classes_per_client=cfg.data.classes_per_client,
        seed=cfg.seed,
    )
    return FederationData([list(p) for p in parts], heldout, kind, scored)


def _source_examples(cfg: RunConfig) -> tuple[list[Example], TaskKind]:
    examples, kind = load_examples(
        cfg.data.source,
        kind=cfg.data.kind,
        columns=cfg.data.columns,
        limit=cfg.data.limit,
        seed=cfg.seed,
    )
    return list(examples), kind


def split_categories(
    examples: Sequence[Example], count: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """``(kept, unseen)``: the examples of ``count`` whole categories (a seeded choice among the
    sorted categories) apart from the rest; both keep the input order."""
    if count == 0:
        return list(examples), []
    categories = sorted({e.category for e in examples})
    if count >= len(categories):
        shown = ", ".join(repr(c) for c in categories[:6]) + (", …" if len(categories) > 6 else "")
        raise ConfigError(
            f"data.heldout_categories = {count}, but the data has {len(categories)} categories "
            f"({shown}): at least one must be left for the clients to train on"
        )
    unseen = set(random.Random(seed).sample(categories, count))
    return (
        [e for e in examples if e.category not in unseen],
        [e for e in examples if e.category in unseen],
    )


def strategy_of(cfg: RunConfig) -> Strategy:
    """``cfg.strategy`` with the client weights ``cfg`` asks for, on either engine."""
    c = cfg.clients
    weighting = configured_weighting(cfg.weighting, c.weights, c.num_clients)
    options = REGISTRY[cfg.strategy].Options
    built = None if options is None else options_of(cfg, options)
    return get_strategy(cfg.strategy, weighting=weighting, options=built, trim=cfg.validation.trim)


def benchmark_of(cfg: RunConfig) -> EvalSet | None:
    """The ``eval.benchmark`` examples: one fixed sample (seed 0), whatever the run's seed."""
    source = cfg.eval.benchmark
    if source is None:
        return None
    examples, kind = load_examples(source, limit=cfg.eval.benchmark_examples, seed=0)
    name = Path(source).stem.replace("-", "_") if "." in source else source.replace("-", "_")
    return EvalSet(name, examples, kind)


def check_client_ranks(clients: Sequence[ClientInfo], shapes: dict[str, tuple[int, int]]) -> None:
    """Every client's rank fits every target module, or a ConfigError naming both."""
    for c in clients:
        for name, shape in shapes.items():
            if c.rank > min(shape):
                raise ConfigError(
                    f"client {c.cid!r}: rank {c.rank} is larger than module {name!r} "
                    f"(shape {shape}) allows; lower clients.ranks"
                )


def server_party(
    cfg: RunConfig,
    loaded: LoadedModel,
    heldout: Sequence[Example],
    kind: TaskKind,
    progress: bool,
    scored: Sequence[EvalSet] = (),
) -> PartyModel:
    """The server's model: merged into, and evaluated on the held-out set, the benchmark
    (``eval.benchmark``) and the data's other ``scored`` sets (:class:`FederationData`)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    benchmark = benchmark_of(cfg)
    sets = [*([benchmark] if benchmark is not None else []), *scored]
    return PartyModel(model, tokenizer, cfg, kind, heldout, progress, sets)


def server_rounds(
    cfg: RunConfig, clients: Sequence[ClientInfo], party: PartyModel, model_params: int
) -> FederatedRounds:
    """The server's side of ``cfg.strategy``'s rounds over ``clients``, after checking that every
    client's rank fits every target module."""
    check_client_ranks(clients, party.shapes)
    return FederatedRounds(cfg, strategy_of(cfg), clients, party.shapes, model_params, party)

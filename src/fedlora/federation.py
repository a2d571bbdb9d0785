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
from fedlora.data import Example, load_examples, partition, split_heldout
from fedlora.errors import ConfigError
from fedlora.models import LoadedModel, load_configured
from fedlora.ranks import client_ranks
from fedlora.rounds import Benchmark, Client, ClientInfo, FederatedRounds, Workbench
from fedlora.strategies import REGISTRY, Strategy, get_strategy
from fedlora.weighting import client_id, configured_weighting


@dataclass
class Federation:
    """Everything a run needs, built once from the config."""

    cfg: RunConfig
    loaded: LoadedModel
    kind: str
    clients: list[Client]
    heldout: list[Example]
    shapes: dict[str, tuple[int, int]]
    model_params: int


def build_federation(cfg: RunConfig) -> Federation:
    """Load model and data, split held-out data, partition clients and assign ranks."""
    check(cfg)
    loaded = load_configured(cfg.model, cfg.seed)
    parts, heldout, kind = federation_data(cfg)
    ranks = client_ranks(cfg.clients.ranks, cfg.clients.num_clients, cfg.clients.rank_set, cfg.seed)
    clients = [
        Client(client_id(k), k, r, cfg.clients.alpha_for(r), list(part))
        for k, (r, part) in enumerate(zip(ranks, parts, strict=True))
    ]
    shapes = adapters.target_shapes(loaded.model, cfg.model.targets)
    check_client_ranks(clients, shapes)
    params = sum(p.numel() for p in loaded.model.parameters())
    return Federation(cfg, loaded, kind, clients, heldout, shapes, params)


def federation_data(cfg: RunConfig) -> tuple[list[list[Example]], list[Example], str]:
    """Every client's training examples, the examples runs are scored on and the data kind; the
    same on every party for the same config and seed.

    The held-out categories (``data.heldout_categories``) leave first, whole; then the test split
    (``data.heldout``) comes off, then the validation split
    (``data.validation``) off the rest; clients train on neither. The scored examples are the
    test split, or the validation split with ``eval.split = "validation"``.
    """
    examples, kind = _source_examples(cfg)
    examples, _ = split_categories(examples, cfg.data.heldout_categories, cfg.seed)
    train, heldout = split_heldout(examples, cfg.data.heldout, seed=cfg.seed)
    if cfg.data.validation:
        train, validation = split_heldout(train, cfg.data.validation, seed=cfg.seed + 1)
        if cfg.eval.split == "validation":
            heldout = validation
    parts = partition(
        train,
        cfg.clients.num_clients,
        cfg.data.partition,
        alpha=cfg.data.dirichlet_alpha,
        classes_per_client=cfg.data.classes_per_client,
        seed=cfg.seed,
    )
    return [list(p) for p in parts], heldout, kind


def _source_examples(cfg: RunConfig) -> tuple[list[Example], str]:
    examples, kind = load_examples(
        cfg.data.source,
        kind=cfg.data.kind,  # type: ignore[arg-type]
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


def unseen_of(cfg: RunConfig) -> Benchmark | None:
    """The ``data.heldout_categories`` set (``unseen_*`` metrics, Rouge-L included when
    ``eval.rouge_samples`` asks for it): up to ``data.heldout`` of their examples, seeded."""
    if not cfg.data.heldout_categories:
        return None
    examples, kind = _source_examples(cfg)
    _, unseen = split_categories(examples, cfg.data.heldout_categories, cfg.seed)
    if len(unseen) > cfg.data.heldout:
        picked = sorted(random.Random(cfg.seed).sample(range(len(unseen)), cfg.data.heldout))
        unseen = [unseen[i] for i in picked]
    return Benchmark("unseen", unseen, kind, rouge=True)


def strategy_of(cfg: RunConfig) -> Strategy:
    """``cfg.strategy`` with the client weights ``cfg`` asks for, on either engine."""
    c = cfg.clients
    weighting = configured_weighting(cfg.weighting, c.weights, c.num_clients)
    options = REGISTRY[cfg.strategy].Options
    if options is None:
        return get_strategy(cfg.strategy, weighting=weighting)
    return get_strategy(cfg.strategy, weighting=weighting, options=options_of(cfg, options))


def benchmark_of(cfg: RunConfig) -> Benchmark | None:
    """The ``eval.benchmark`` examples: one fixed sample (seed 0), whatever the run's seed."""
    source = cfg.eval.benchmark
    if source is None:
        return None
    examples, kind = load_examples(source, limit=cfg.eval.benchmark_examples, seed=0)
    name = Path(source).stem.replace("-", "_") if "." in source else source.replace("-", "_")
    return Benchmark(name, examples, kind)


def check_client_ranks(clients: Sequence[ClientInfo], shapes: dict[str, tuple[int, int]]) -> None:
    """Every client's rank fits every target module, or a ConfigError naming both."""
    for c in clients:
        for name, shape in shapes.items():
            if c.rank > min(shape):
                raise ConfigError(
                    f"client {c.cid!r}: rank {c.rank} is larger than module {name!r} "
                    f"(shape {shape}) allows; lower clients.ranks"
                )


def server_bench(
    cfg: RunConfig, loaded: LoadedModel, heldout: Sequence[Example], kind: str, progress: bool
) -> Workbench:
    """The server's model: merged into, and evaluated on the held-out set, the benchmark and the
    held-out categories."""
    model, tokenizer = loaded.model, loaded.tokenizer
    sets = [b for b in (benchmark_of(cfg), unseen_of(cfg)) if b is not None]
    return Workbench(model, tokenizer, cfg, kind, heldout, progress, sets)


def server_rounds(
    cfg: RunConfig, clients: Sequence[ClientInfo], bench: Workbench, model_params: int
) -> FederatedRounds:
    """The server's side of ``cfg.strategy``'s rounds over ``clients``, after checking that every
    client's rank fits every target module."""
    check_client_ranks(clients, bench.shapes)
    return FederatedRounds(cfg, strategy_of(cfg), clients, bench.shapes, model_params, bench)

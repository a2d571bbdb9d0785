"""The in-process runner: rounds, client sampling, local training, aggregation, evaluation.

It only moves data along the path ``redistribute → train → aggregate → (merge) → evaluate`` and
acts on each strategy's traits; all math lives in :mod:`fedlora.strategies`. ``centralized``
(all client data pooled, one LoRA) and ``standalone`` (every client alone; the mean is reported)
are the reference points. Per-client state that outlives a round (standalone adapters) is kept
on disk as safetensors, so memory does not grow with the number of registered clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fedlora import adapters, seeds
from fedlora.checkpoint import put_deltas, take_factors
from fedlora.config import RunConfig, check, options_of
from fedlora.data import Example, load_examples, partition, split_heldout
from fedlora.errors import ConfigError
from fedlora.lora import LoRAFactors
from fedlora.models import LoadedModel, load_model
from fedlora.ranks import client_ranks
from fedlora.rounds import (
    Benchmark,
    Client,
    ClientInfo,
    Failure,
    FederatedRounds,
    LocalPlan,
    LocalResult,
    RoundRecord,
    Task,
    Workbench,
    sample_clients,
)
from fedlora.strategies import REGISTRY, Strategy, get_strategy
from fedlora.train import num_steps
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


@dataclass
class RunOutcome:
    """The final global result of a run (None: standalone has none)."""

    export: dict[str, LoRAFactors] | None
    export_error: float | None = None
    unmerged: dict[str, LoRAFactors] | None = None
    """What of ``export`` the server's base weights do not hold yet (None: all of it)."""


def build_federation(cfg: RunConfig) -> Federation:
    """Load model and data, split held-out data, partition clients and assign ranks."""
    check(cfg)
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.seed)
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
    """Every client's training examples, the held-out examples and the data kind; the same on
    every party for the same config and seed."""
    examples, kind = load_examples(
        cfg.data.source,
        kind=cfg.data.kind,  # type: ignore[arg-type]
        columns=cfg.data.columns,
        limit=cfg.data.limit,
        seed=cfg.seed,
    )
    train, heldout = split_heldout(examples, cfg.data.heldout, seed=cfg.seed)
    parts = partition(
        train,
        cfg.clients.num_clients,
        cfg.data.partition,
        alpha=cfg.data.dirichlet_alpha,
        classes_per_client=cfg.data.classes_per_client,
        seed=cfg.seed,
    )
    return [list(p) for p in parts], heldout, kind


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


Snapshot: TypeAlias = tuple[dict[str, torch.Tensor], dict[str, Any]]
"""A run's state after a round: tensors, and metadata that JSON can hold."""

OnRound: TypeAlias = Callable[[RoundRecord, Snapshot], None]
"""Called after every round (round 0: the base model) with its record and the run's state."""


class Runner:
    """Runs one federation with one strategy (or centralized / standalone), in this process.

    After every round it hands the record and a :data:`Snapshot` of the run's state to
    ``on_round``; ``run(..., resume=snapshot)`` continues from one, with the same result as a run
    that never stopped (every random draw is seeded by round and client, or is in the snapshot).
    """

    def __init__(self, fed: Federation, workdir: Path, progress: bool = True):
        self.fed = fed
        self.cfg = fed.cfg
        self.workdir = workdir
        self.progress = progress
        self.bench = Workbench(
            fed.loaded.model,
            fed.loaded.tokenizer,
            fed.cfg,
            fed.kind,
            fed.heldout,
            progress,
            benchmark_of(fed.cfg),
        )
        self.states: AdapterStore | None = None
        """Each client's own state across rounds, for a hook that keeps one."""

    @property
    def model(self) -> Any:
        return self.bench.model

    @property
    def tokenizer(self) -> Any:
        return self.bench.tokenizer

    def rounds(self, first: int = 1) -> Any:
        return tqdm(
            range(first, self.cfg.rounds + 1),
            desc=self.cfg.strategy,
            disable=not self.progress,
            initial=first - 1,
            total=self.cfg.rounds,
        )

    def due(self, t: int) -> bool:
        return t == self.cfg.rounds or t % self.cfg.eval.every == 0

    def run(self, on_round: OnRound, resume: Snapshot | None = None) -> RunOutcome:
        if resume is not None and resume[1].get("mode") != self.cfg.strategy:
            raise ConfigError(
                f"the checkpoint is of a {resume[1].get('mode')!r} run, not {self.cfg.strategy!r}"
            )
        if self.cfg.strategy == "centralized":
            return self.run_centralized(on_round, resume)
        if self.cfg.strategy == "standalone":
            return self.run_standalone(on_round, resume)
        return self.run_federated(strategy_of(self.cfg), on_round, resume)

    def run_federated(
        self, strategy: Strategy, on_round: OnRound, resume: Snapshot | None = None
    ) -> RunOutcome:
        """The rounds of :class:`FederatedRounds`, each client trained here in turn on the
        shared model (so merged base updates are already in it)."""
        fed = self.fed
        server = FederatedRounds(
            self.cfg, strategy, fed.clients, fed.shapes, fed.model_params, self.bench
        )
        if resume is None:
            on_round(server.start(), server.snapshot())
        else:
            server.restore(*resume)
        if server.hook.keeps_state:
            self.states = AdapterStore(self.workdir / "clients")
            self.states.forget_after(server.done)
        for t in self.rounds(server.done + 1):
            on_round(server.run_round(t, self.execute), server.snapshot())
            if self.states is not None:
                self.states.prune(t)
        factors, err = server.export()
        return RunOutcome(factors, err, server.unmerged())

    def execute(self, tasks: list[Task]) -> list[LocalResult | Failure]:
        """Train each task's client here in turn, with the faults of ``[faults]`` injected."""
        out: list[LocalResult | Failure] = []
        for task in tasks:
            client = self.fed.clients[task.client.index]
            fault = injected_fault(self.cfg, task)
            if fault == "crash_before":
                out.append(Failure("injected fault: crashed before training"))
                continue
            local = None
            if fault == "straggler":
                steps = num_steps(self.cfg.train, len(client.examples))
                work = max(1, int(self.cfg.faults.straggler_work * steps))
                local = dataclasses.replace(self.cfg.train, steps=work, epochs=None)
            state = None
            if self.states is not None:
                state = StoredState(self.states, client.cid, task.round)
            result = self.bench.train(client, task.plan, task.round, local, state)
            if fault == "crash_after":
                out.append(Failure("injected fault: crashed after training, before replying"))
            elif fault == "timeout":
                out.append(Failure("injected fault: no reply before the round closed"))
            else:
                out.append(result)
        return out

    def run_centralized(self, on_round: OnRound, resume: Snapshot | None = None) -> RunOutcome:
        """One LoRA of the largest client rank on all client data pooled; per round as many
        optimizer steps as the sampled clients of a federated round take together."""
        pooled = [e for c in self.fed.clients for e in c.examples]
        rank = max(c.rank for c in self.fed.clients)
        central = Client("centralized", 0, rank, self.cfg.clients.alpha_for(rank), pooled)
        k = max(1, round(self.cfg.clients.fraction * len(self.fed.clients)))
        local = dataclasses.replace(self.cfg.train, steps=self.cfg.train.steps * k)

        def snapshot(t: int, factors: dict[str, LoRAFactors] | None) -> Snapshot:
            tensors: dict[str, torch.Tensor] = {}
            put_deltas(tensors, "factors", factors or {})
            return tensors, {"mode": "centralized", "round": t}

        factors: dict[str, LoRAFactors] | None = None
        first = 1
        if resume is None:
            on_round(RoundRecord(0, self.bench.evaluate()), snapshot(0, None))
        else:
            factors = take_factors(resume[0], "factors") or None
            first = int(resume[1]["round"]) + 1
        for t in self.rounds(first):
            result = self.bench.train(central, LocalPlan(rank, factors), t, local)
            factors = result.factors
            metrics = self.bench.evaluate_with(factors) if self.due(t) else {}
            on_round(RoundRecord(t, metrics, result.loss, ["centralized"]), snapshot(t, factors))
        return RunOutcome(factors)

    def run_standalone(self, on_round: OnRound, resume: Snapshot | None = None) -> RunOutcome:
        """Each client trains its own adapter across rounds (kept on disk, one file per client
        and round, so a resumed run finds every adapter as it was at its checkpoint); the
        reported metric is the mean over the round's clients of each one's adapter on the
        held-out set."""
        store = AdapterStore(self.workdir / "clients")
        sampler = seeds.generator(self.cfg.seed, seeds.SAMPLER)

        def snapshot(t: int) -> Snapshot:
            return {"sampler": sampler.get_state()}, {"mode": "standalone", "round": t}

        first = 1
        if resume is None:
            on_round(RoundRecord(0, self.bench.evaluate()), snapshot(0))
        else:
            sampler.set_state(resume[0]["sampler"])
            first = int(resume[1]["round"]) + 1
        store.forget_after(first - 1)
        for t in self.rounds(first):
            sampled = sample_clients(self.fed.clients, self.cfg.clients.fraction, sampler)
            per_client: list[dict[str, float]] = []
            losses = []
            for client in sampled:
                start = store.load(client.cid)
                result = self.bench.train(client, LocalPlan(client.rank, start), t)
                store.save(client.cid, t, result.factors)
                losses.append(result.loss)
                if self.due(t):
                    per_client.append(self.bench.evaluate_with(result.factors))
            metrics = (
                {k: sum(m[k] for m in per_client) / len(per_client) for k in per_client[0]}
                if per_client
                else {}
            )
            record = RoundRecord(t, metrics, sum(losses) / len(losses), [c.cid for c in sampled])
            on_round(record, snapshot(t))
            store.prune(t)
        return RunOutcome(None)


def injected_fault(cfg: RunConfig, task: Task) -> str | None:
    """The fault ``[faults]`` injects into ``task`` (``crash_before``, ``crash_after``,
    ``timeout``, ``straggler``) or None; one uniform draw seeded by (seed, round, try, client)."""
    f = cfg.faults
    gen = seeds.generator(cfg.seed, seeds.FAULTS, task.round, task.attempt, task.client.index)
    u = float(torch.rand(1, generator=gen))
    edge = 0.0
    for name, p in (
        ("crash_before", f.crash_before),
        ("crash_after", f.crash_after),
        ("timeout", f.timeout),
        ("straggler", f.straggler),
    ):
        edge += p
        if u < edge:
            return name
    return None


class AdapterStore:
    """Per-client adapters on disk, ``FOLDER/CID.rROUND.safetensors``: the newest is a client's
    adapter; older ones are pruned once a checkpoint past them exists."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _versions(self, cid: str) -> list[tuple[int, Path]]:
        found = []
        for path in self.folder.glob(f"{cid}.r*.safetensors"):
            tag = path.name[len(cid) + 2 : -len(".safetensors")]
            if tag.isdigit():
                found.append((int(tag), path))
        return sorted(found)

    def load(self, cid: str) -> dict[str, LoRAFactors] | None:
        versions = self._versions(cid)
        if not versions:
            return None
        tensors: dict[str, torch.Tensor] = load_file(str(versions[-1][1]))
        return take_factors(tensors, "factors")

    def save(self, cid: str, t: int, factors: dict[str, LoRAFactors]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        put_deltas(tensors, "factors", factors)
        path = self.folder / f"{cid}.r{t}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)

    def forget_after(self, t: int) -> None:
        """Delete adapters of rounds after ``t`` (written by a run that stopped mid-round)."""
        for path in self.folder.glob("*.r*.safetensors"):
            tag = path.name.rsplit(".r", 1)[-1][: -len(".safetensors")]
            if tag.isdigit() and int(tag) > t:
                path.unlink()

    def prune(self, t: int) -> None:
        """Keep only each client's newest adapter of rounds ``<= t``."""
        cids = {p.name.rsplit(".r", 1)[0] for p in self.folder.glob("*.r*.safetensors")}
        for cid in cids:
            for _, path in [v for v in self._versions(cid) if v[0] <= t][:-1]:
                path.unlink()


@dataclass(frozen=True)
class StoredState:
    """One client's :class:`fedlora.clients.ClientState` in an :class:`AdapterStore`, saved as of
    round ``t`` (so resuming from round ``t``'s checkpoint finds it as it was)."""

    store: AdapterStore
    cid: str
    t: int

    def load(self) -> dict[str, LoRAFactors] | None:
        return self.store.load(self.cid)

    def save(self, factors: dict[str, LoRAFactors]) -> None:
        self.store.save(self.cid, self.t, factors)

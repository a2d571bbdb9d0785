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
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fedlora import adapters
from fedlora.config import RunConfig, check
from fedlora.data import Example, load_examples, partition, split_heldout
from fedlora.errors import ConfigError
from fedlora.lora import LoRAFactors
from fedlora.models import LoadedModel, load_model
from fedlora.ranks import client_ranks
from fedlora.rounds import (
    Client,
    ClientInfo,
    FederatedRounds,
    LocalPlan,
    RoundRecord,
    Workbench,
    derive_seed,
    sample_clients,
)
from fedlora.strategies import Strategy, get_strategy


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
    """What a run leaves in memory for the report: records and the final global result."""

    records: list[RoundRecord]
    export: dict[str, LoRAFactors] | None
    export_error: float | None = None


def build_federation(cfg: RunConfig) -> Federation:
    """Load model and data, split held-out data, partition clients and assign ranks."""
    check(cfg)
    loaded = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype, seed=cfg.seed)
    parts, heldout, kind = federation_data(cfg)
    ranks = client_ranks(cfg.clients.ranks, cfg.clients.num_clients, cfg.clients.rank_set, cfg.seed)
    clients = [
        Client(f"client-{k:04d}", k, r, cfg.clients.alpha or 2.0 * r, list(part))
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


def check_client_ranks(clients: Sequence[ClientInfo], shapes: dict[str, tuple[int, int]]) -> None:
    """Every client's rank fits every target module, or a ConfigError naming both."""
    for c in clients:
        for name, shape in shapes.items():
            if c.rank > min(shape):
                raise ConfigError(
                    f"client {c.cid!r}: rank {c.rank} is larger than module {name!r} "
                    f"(shape {shape}) allows; lower clients.ranks"
                )


class Runner:
    """Runs one federation with one strategy (or centralized / standalone), in this process."""

    def __init__(self, fed: Federation, workdir: Path, progress: bool = True):
        self.fed = fed
        self.cfg = fed.cfg
        self.workdir = workdir
        self.progress = progress
        self.bench = Workbench(
            fed.loaded.model, fed.loaded.tokenizer, fed.cfg, fed.kind, fed.heldout, progress
        )

    @property
    def model(self) -> Any:
        return self.bench.model

    @property
    def tokenizer(self) -> Any:
        return self.bench.tokenizer

    def rounds(self) -> Any:
        return tqdm(
            range(1, self.cfg.rounds + 1), desc=self.cfg.strategy, disable=not self.progress
        )

    def due(self, t: int) -> bool:
        return t == self.cfg.rounds or t % self.cfg.eval.every == 0

    def run(self, on_record: Callable[[RoundRecord], None]) -> RunOutcome:
        if self.cfg.strategy == "centralized":
            return self.run_centralized(on_record)
        if self.cfg.strategy == "standalone":
            return self.run_standalone(on_record)
        return self.run_federated(
            get_strategy(self.cfg.strategy, weighting=self.cfg.weighting), on_record
        )

    def run_federated(
        self, strategy: Strategy, on_record: Callable[[RoundRecord], None]
    ) -> RunOutcome:
        """The rounds of :class:`FederatedRounds`, each client trained here in turn on the
        shared model (so merged base updates are already in it)."""
        fed = self.fed
        server = FederatedRounds(
            self.cfg, strategy, fed.clients, fed.shapes, fed.model_params, self.bench
        )
        records = [server.start()]
        on_record(records[0])
        for t in self.rounds():
            tasks = server.tasks(t)
            results = [
                self.bench.train(fed.clients[task.client.index], task.plan, t) for task in tasks
            ]
            records.append(server.finish(tasks, results))
            on_record(records[-1])
        factors, err = server.export()
        return RunOutcome(records, factors, err)

    def run_centralized(self, on_record: Callable[[RoundRecord], None]) -> RunOutcome:
        """One LoRA of the largest client rank on all client data pooled; per round as many
        optimizer steps as the sampled clients of a federated round take together."""
        pooled = [e for c in self.fed.clients for e in c.examples]
        rank = max(c.rank for c in self.fed.clients)
        central = Client("centralized", 0, rank, self.cfg.clients.alpha or 2.0 * rank, pooled)
        records = [RoundRecord(0, self.bench.evaluate())]
        on_record(records[0])
        factors: dict[str, LoRAFactors] | None = None
        k = max(1, round(self.cfg.clients.fraction * len(self.fed.clients)))
        local = dataclasses.replace(self.cfg.train, steps=self.cfg.train.steps * k)
        for t in self.rounds():
            result = self.bench.train(central, LocalPlan(rank, factors), t, local)
            factors = result.factors
            metrics = self.bench.evaluate_with(factors) if self.due(t) else {}
            record = RoundRecord(t, metrics, result.loss, ["centralized"])
            records.append(record)
            on_record(record)
        return RunOutcome(records, factors)

    def run_standalone(self, on_record: Callable[[RoundRecord], None]) -> RunOutcome:
        """Each client trains its own adapter across rounds (kept on disk); the reported metric
        is the mean over the round's clients of each one's adapter on the held-out set."""
        store = self.workdir / "clients"
        store.mkdir(parents=True, exist_ok=True)
        records = [RoundRecord(0, self.bench.evaluate())]
        on_record(records[0])
        sampler = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 1))
        for t in self.rounds():
            sampled = sample_clients(self.fed.clients, self.cfg.clients.fraction, sampler)
            per_client: list[dict[str, float]] = []
            losses = []
            for client in sampled:
                path = store / f"{client.cid}.safetensors"
                start = load_factors(path) if path.exists() else None
                result = self.bench.train(client, LocalPlan(client.rank, start), t)
                save_factors(path, result.factors)
                losses.append(result.loss)
                if self.due(t):
                    per_client.append(self.bench.evaluate_with(result.factors))
            metrics = (
                {k: sum(m[k] for m in per_client) / len(per_client) for k in per_client[0]}
                if per_client
                else {}
            )
            record = RoundRecord(t, metrics, sum(losses) / len(losses), [c.cid for c in sampled])
            records.append(record)
            on_record(record)
        return RunOutcome(records, None)


def save_factors(path: Path, factors: dict[str, LoRAFactors]) -> None:
    tensors = {}
    for name, f in factors.items():
        tensors[f"{name}.A"] = f.A.contiguous()
        tensors[f"{name}.B"] = f.B.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_factors(path: Path) -> dict[str, LoRAFactors]:
    tensors = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: LoRAFactors(A=tensors[f"{n}.A"], B=tensors[f"{n}.B"]) for n in names}

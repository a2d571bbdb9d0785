"""The in-process runner: rounds, client sampling, local training, aggregation, evaluation.

It only moves data along the path ``redistribute → train → aggregate → (merge) → evaluate`` and
acts on each strategy's traits; all math lives in :mod:`fedlora.strategies`. ``centralized``
(all client data pooled, one LoRA) and ``standalone`` (every client alone; the mean is reported)
are the reference points. Per-client state that outlives a round (standalone adapters) is kept
on disk as safetensors, so memory does not grow with the number of registered clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fedlora import adapters
from fedlora.comm import Traffic, delta_params, factor_params
from fedlora.config import RunConfig, check
from fedlora.data import Example, encode, load_examples, partition, split_heldout
from fedlora.errors import ConfigError
from fedlora.evaluate import evaluate
from fedlora.linalg import stack
from fedlora.lora import BaseDelta, ClientUpdate, LoRAFactors
from fedlora.models import LoadedModel, load_model
from fedlora.ranks import client_ranks
from fedlora.strategies import Start, Strategy, get_strategy
from fedlora.strategies.hetlora import pruned_rank, self_prune
from fedlora.train import num_steps, train_local


@dataclass(frozen=True)
class Client:
    cid: str
    index: int
    """Position among the registered clients; seeds the client's adapter init and batches."""
    rank: int
    alpha: float
    examples: list[Example]


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


@dataclass(frozen=True)
class LocalPlan:
    """What one client does in a round, decided from the strategy's traits."""

    rank: int
    start: Start = None
    frozen: Start = None
    """Components held in the forward pass but not trained (hafl-freeze)."""
    freeze_a: bool = False
    importance: bool = False
    adapter: str = "lora"
    prune_gamma: float | None = None
    """HetLoRA self-pruning with this γ (None: no pruning)."""


@dataclass(frozen=True)
class LocalResult:
    factors: dict[str, LoRAFactors]
    loss: float
    importance: dict[str, torch.Tensor] | None
    kept: dict[str, int]
    """Components per module that carry the update (after AdaLoRA's or HetLoRA's pruning)."""

    @property
    def mean_rank(self) -> float:
        return sum(self.kept.values()) / len(self.kept)


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float]
    train_loss: float | None = None
    clients: list[str] = field(default_factory=list)
    traffic: list[Traffic] = field(default_factory=list)
    rank_sum_before: int | None = None
    """Σ over the round's clients of the rank each started local training with."""
    rank_sum_after: float | None = None
    """Σ over the round's clients of the rank each sent (mean over modules of kept components)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            **{f"eval_{k}": v for k, v in self.metrics.items()},
            "train_loss": self.train_loss,
            "clients": self.clients,
            "traffic": [t.to_json() for t in self.traffic],
        }
        if self.rank_sum_before is not None:
            out.update(rank_sum_before=self.rank_sum_before, rank_sum_after=self.rank_sum_after)
        return out


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
    ranks = client_ranks(cfg.clients.ranks, cfg.clients.num_clients, cfg.clients.rank_set, cfg.seed)
    clients = [
        Client(f"client-{k:04d}", k, r, cfg.clients.alpha or 2.0 * r, list(part))
        for k, (r, part) in enumerate(zip(ranks, parts, strict=True))
    ]
    shapes = adapters.target_shapes(loaded.model, cfg.model.targets)
    for c in clients:
        for name, shape in shapes.items():
            if c.rank > min(shape):
                raise ConfigError(
                    f"client {c.cid!r}: rank {c.rank} is larger than module {name!r} "
                    f"(shape {shape}) allows; lower clients.ranks"
                )
    params = sum(p.numel() for p in loaded.model.parameters())
    return Federation(cfg, loaded, kind, clients, heldout, shapes, params)


def _seed(*parts: int) -> int:
    """A deterministic seed from integers (no global RNG)."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + p) % (2**63 - 1)
    return value


class Runner:
    """Runs one federation with one strategy (or centralized / standalone)."""

    def __init__(self, fed: Federation, workdir: Path, progress: bool = True):
        self.fed = fed
        self.cfg = fed.cfg
        self.workdir = workdir
        self.progress = progress
        self.local = self.cfg.train
        self.model = fed.loaded.model
        self.tokenizer = fed.loaded.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.sampler = torch.Generator().manual_seed(_seed(self.cfg.seed, 1))
        self.ranks = {c.cid: c.rank for c in fed.clients}
        """Each client's current rank (HetLoRA's self-pruning lowers it)."""

    # --- building blocks -------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        return evaluate(
            self.model,
            self.tokenizer,
            self.fed.heldout,
            self.fed.kind,  # type: ignore[arg-type]
            batch_size=self.cfg.eval.batch_size,
            max_length=self.cfg.model.max_length,
            rouge_samples=self.cfg.eval.rouge_samples,
            max_new_tokens=self.cfg.eval.max_new_tokens,
        )

    def evaluate_with(self, factors: dict[str, LoRAFactors] | None) -> dict[str, float]:
        """Evaluate the base model with ``factors`` attached (scaling 1), or the bare base."""
        if not factors:
            return self.evaluate()
        peft_model = adapters.attach_factors(self.model, self.cfg.model.targets, factors)
        try:
            return self.evaluate()
        finally:
            self.model = adapters.detach(peft_model)

    def due(self, t: int) -> bool:
        return t == self.cfg.rounds or t % self.cfg.eval.every == 0

    def sample(self) -> list[Client]:
        n = len(self.fed.clients)
        k = max(1, round(self.cfg.clients.fraction * n))
        picked = torch.randperm(n, generator=self.sampler)[:k].sort().values.tolist()
        return [self.fed.clients[i] for i in picked]

    def train_client(self, client: Client, plan: LocalPlan, t: int) -> LocalResult:
        """Attach a fresh adapter of the plan's rank, load its start (and frozen components),
        train (tracking importance, regularising the tail or running AdaLoRA's budget as the plan
        says), read the factors and scores, detach."""
        r = plan.rank
        seed = _seed(self.cfg.seed, t, client.index)
        data = encode(client.examples, self.tokenizer, self.cfg.model.max_length)
        steps = num_steps(self.local, len(data))
        if plan.adapter == "adalora":
            target = max(1, round(self.cfg.adalora.target_ratio * r))
            peft_model = adapters.attach_adalora(
                self.model,
                self.cfg.model.targets,
                r,
                client.alpha,
                seed,
                steps,
                target,
                self.cfg.adalora,
            )
        else:
            peft_model = adapters.attach(
                self.model, self.cfg.model.targets, r, client.alpha, seed=seed
            )
        try:
            if plan.start:
                adapters.write_factors(peft_model, plan.start)
            if plan.frozen:
                adapters.add_frozen(peft_model, plan.frozen)
            if plan.freeze_a:
                adapters.freeze_a(peft_model)
            label = f"round {t} {client.cid} (r={r})" if self.progress else None
            tracker = adapters.importance_tracker(peft_model) if plan.importance else None
            penalty = None
            if plan.prune_gamma is not None and self.cfg.hetlora.reg > 0:
                keep = {n: pruned_rank(r, plan.prune_gamma) for n in self.fed.shapes}
                tail = adapters.tail_penalty(peft_model, keep)
                reg = self.cfg.hetlora.reg
                penalty = lambda: reg * tail()  # noqa: E731
            allocate = (
                peft_model.base_model.update_and_allocate if plan.adapter == "adalora" else None
            )
            result = train_local(
                peft_model,
                data,
                self.local,
                self.pad_id,
                seed,
                label,
                on_step=tracker.step if tracker is not None else None,
                penalty=penalty,
                after_step=allocate,
            )
            factors = adapters.read_factors(peft_model)
            kept = adapters.kept_ranks(peft_model)
            scores = tracker.scores() if tracker is not None else None
        finally:
            self.model = adapters.detach(peft_model)
        if plan.prune_gamma is not None:
            pruned = self_prune(plan.start, factors, plan.prune_gamma)
            if pruned is not None:
                factors = pruned
                kept = {n: f.rank for n, f in pruned.items()}
        return LocalResult(factors, result.loss, scores, kept)

    def traffic(self, client: Client, up: int, down: int, rank: int) -> Traffic:
        return Traffic(client.cid, rank, up, down, 4, self.fed.model_params)

    def rounds(self) -> Any:
        return tqdm(
            range(1, self.cfg.rounds + 1), desc=self.cfg.strategy, disable=not self.progress
        )

    # --- modes -----------------------------------------------------------------------------

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
        init_gen = torch.Generator().manual_seed(_seed(self.cfg.seed, 2))
        max_rank = max(c.rank for c in self.fed.clients)
        state = strategy.init_state(self.fed.shapes, max_rank, init_gen)
        records = [RoundRecord(0, self.evaluate())]
        on_record(records[0])
        merged: dict[str, list[BaseDelta]] = {}
        sent_down: dict[str, BaseDelta] = {}
        traits = strategy.traits
        for t in self.rounds():
            sampled = self.sample()
            ranks = [self.ranks[c.cid] for c in sampled]
            starts = strategy.redistribute(state, ranks)
            updates, traffic, losses, kept = [], [], [], []
            for client, rank, start in zip(sampled, ranks, starts, strict=True):
                plan = LocalPlan(
                    rank,
                    start,
                    strategy.frozen_components(state, rank),
                    traits.fixed_a,
                    traits.needs_importance,
                    traits.client_adapter,
                    self.cfg.hetlora.gamma
                    if traits.self_pruning and self.cfg.hetlora.prune
                    else None,
                )
                local = self.train_client(client, plan, t)
                b_only = traits.fixed_a
                down = (
                    factor_params(start, b_only)
                    + factor_params(plan.frozen)
                    + delta_params(sent_down)
                )
                up = factor_params(local.factors, b_only)
                traffic.append(self.traffic(client, up, down, rank))
                index = strategy.component_indices(state, rank)
                if index is not None:  # pruning keeps the first components of each
                    index = {n: i[: local.factors[n].rank] for n, i in index.items()}
                updates.append(
                    ClientUpdate(
                        client.cid,
                        local.factors,
                        len(client.examples),
                        {"loss": local.loss},
                        component_index=index,
                        importance=local.importance,
                    )
                )
                losses.append(local.loss)
                kept.append(local.mean_rank)
                if plan.prune_gamma is not None:  # a pruned rank stays pruned
                    self.ranks[client.cid] = min(f.rank for f in local.factors.values())
            state = strategy.aggregate(state, updates)
            if strategy.traits.merges_into_base:
                adapters.merge_delta(self.model, state.base_delta)
                for name, delta in state.base_delta.items():
                    merged.setdefault(name, []).append(delta)
                sent_down = dict(state.base_delta)
            metrics = self.evaluate_with(dict(state.factors)) if self.due(t) else {}
            record = RoundRecord(
                t, metrics, sum(losses) / len(losses), [c.cid for c in sampled], traffic
            )
            if traits.client_adapter != "lora" or traits.self_pruning:
                record.rank_sum_before = sum(ranks)
                record.rank_sum_after = sum(kept)
            records.append(record)
            on_record(record)
        if strategy.traits.merges_into_base:
            factors, err = accumulated_factors(merged, self.cfg.export_rank)
            return RunOutcome(records, factors, err)
        return RunOutcome(records, dict(state.factors))

    def run_centralized(self, on_record: Callable[[RoundRecord], None]) -> RunOutcome:
        """One LoRA of the largest client rank on all client data pooled; per round as many
        optimizer steps as the sampled clients of a federated round take together."""
        pooled = [e for c in self.fed.clients for e in c.examples]
        rank = max(c.rank for c in self.fed.clients)
        central = Client("centralized", 0, rank, self.cfg.clients.alpha or 2.0 * rank, pooled)
        records = [RoundRecord(0, self.evaluate())]
        on_record(records[0])
        factors: dict[str, LoRAFactors] | None = None
        k = max(1, round(self.cfg.clients.fraction * len(self.fed.clients)))
        steps = self.local.steps * k
        self.local = dataclasses.replace(self.cfg.train, steps=steps)
        for t in self.rounds():
            local = self.train_client(central, LocalPlan(rank, factors), t)
            factors, loss = local.factors, local.loss
            metrics = self.evaluate_with(factors) if self.due(t) else {}
            record = RoundRecord(t, metrics, loss, ["centralized"])
            records.append(record)
            on_record(record)
        return RunOutcome(records, factors)

    def run_standalone(self, on_record: Callable[[RoundRecord], None]) -> RunOutcome:
        """Each client trains its own adapter across rounds (kept on disk); the reported metric
        is the mean over the round's clients of each one's adapter on the held-out set."""
        store = self.workdir / "clients"
        store.mkdir(parents=True, exist_ok=True)
        records = [RoundRecord(0, self.evaluate())]
        on_record(records[0])
        for t in self.rounds():
            sampled = self.sample()
            per_client: list[dict[str, float]] = []
            losses = []
            for client in sampled:
                path = store / f"{client.cid}.safetensors"
                start = load_factors(path) if path.exists() else None
                local = self.train_client(client, LocalPlan(client.rank, start), t)
                factors = local.factors
                save_factors(path, factors)
                losses.append(local.loss)
                if self.due(t):
                    per_client.append(self.evaluate_with(factors))
            metrics = (
                {k: sum(m[k] for m in per_client) / len(per_client) for k in per_client[0]}
                if per_client
                else {}
            )
            record = RoundRecord(t, metrics, sum(losses) / len(losses), [c.cid for c in sampled])
            records.append(record)
            on_record(record)
        return RunOutcome(records, None)


def accumulated_factors(
    merged: dict[str, list[BaseDelta]], export_rank: int | None
) -> tuple[dict[str, LoRAFactors], float | None]:
    """FLoRA's total update ``Σ_t ΔW_t`` per module as factors: exact (stacked over rounds), or
    compressed to ``export_rank`` by SVD with the largest relative Frobenius error returned."""
    from fedlora.linalg import svd_factors, truncate

    out: dict[str, LoRAFactors] = {}
    worst = 0.0
    for name, deltas in merged.items():
        parts = [d if isinstance(d, LoRAFactors) else dense_as_factors(d) for d in deltas]
        total = stack(parts, [1.0] * len(parts))
        if export_rank is None and total.rank <= min(total.shape):
            out[name] = total
            continue
        svd = svd_factors(total)
        keep = min(export_rank or svd.rank, svd.rank)
        s = torch.linalg.norm(svd.B, dim=0)
        norm = float(torch.linalg.norm(s))
        worst = max(worst, float(torch.linalg.norm(s[keep:])) / norm if norm > 0 else 0.0)
        out[name] = truncate(svd, keep)
    return out, (worst if export_rank is not None else None)


def dense_as_factors(delta: torch.Tensor) -> LoRAFactors:
    """A dense ``(d_out, d_in)`` update as exact factors ``U S`` and ``Vh``."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return LoRAFactors(A=Vh.contiguous(), B=(U * S).contiguous())


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

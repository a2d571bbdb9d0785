"""One federated round, for any engine: what the server plans, what a client does, what comes back.

The path of a round is ``sample → plan → train → aggregate → (merge) → evaluate``. The server side
(:class:`FederatedRounds`) samples clients, plans each one's local work from the strategy's traits
and state, aggregates what comes back with the strategy and records the round. The client side
(:meth:`PartyModel.train`) trains one plan on one client's data. An engine only moves plans and
results between the two: the in-process runner calls the party model directly
(:mod:`fedlora.simulation`), Flower sends them as messages (:mod:`fedlora.flower`). All math lives
in :mod:`fedlora.strategies`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import torch

from fedlora import adapters, devices, privacy, seeds
from fedlora.checkpoint import put_deltas, take_deltas, take_factors
from fedlora.clients import ClientState, LocalPlan, Session, Upload
from fedlora.comm import BYTES_PER_PARAM, Traffic, delta_params, factor_params
from fedlora.config import RunConfig, TrainConfig
from fedlora.data import Example, TaskKind
from fedlora.data.encode import LazyEncoded
from fedlora.errors import UpdateError
from fedlora.evaluate import evaluate
from fedlora.local import finish_upload, open_adapters
from fedlora.lora import (
    BaseDelta,
    ClientUpdate,
    Expected,
    LoRAFactors,
    screen_update,
    update_norm,
)
from fedlora.methods import hook_for
from fedlora.precision import MergedBase
from fedlora.seeds import derive_seed
from fedlora.strategies import GlobalState, Strategy
from fedlora.train import Member, computes_in_float16, num_steps, train_fused, train_local

__all__ = ["LocalPlan", "derive_seed"]  # re-exported: engines and tests take them from here


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of a registered client."""

    cid: str
    index: int
    """Position among the registered clients; seeds the client's adapter init and batches."""
    rank: int
    alpha: float


@dataclass(frozen=True)
class Client(ClientInfo):
    """A client with its data (in-process, or on its own node)."""

    examples: list[Example]


@dataclass(frozen=True)
class LocalResult:
    factors: dict[str, LoRAFactors]
    loss: float | None
    """The client's mean training loss; None where it keeps it to itself (privacy on:
    :func:`fedlora.privacy.withholds`)."""
    importance: dict[str, torch.Tensor] | None
    kept: dict[str, int]
    """Components per module that carry the update (after AdaLoRA's or HetLoRA's pruning)."""
    num_examples: int | None
    """Its example count; None where it did not say (a private Flower node): the server knows
    the count it fixed when the client joined (:attr:`FederatedRounds.examples`)."""
    next_rank: int | None = None
    """The rank the client trains from the next round on (HetLoRA's pruning); None: unchanged."""
    personal: dict[str, float] = field(default_factory=dict)
    """Held-out metrics of the client's own trained model right after its training,
    ``(A_k, B_k)`` (:attr:`LocalPlan.score`; reported as ``personal_local_*``)."""
    own: dict[str, LoRAFactors] | None = None
    """The client's own trained factors, before any privacy noise, where it is scored after the
    broadcast too (FedSA-LoRA's ``(Ā, B_k)``, reported as ``personal_*``)."""

    @property
    def mean_rank(self) -> float:
        """Mean components per module that carry the update (the factors' ranks where the result
        says nothing of pruning)."""
        kept = self.kept or {name: f.rank for name, f in self.factors.items()}
        return sum(kept.values()) / len(kept)

    @classmethod
    def of(
        cls,
        upload: Upload,
        loss: float | None,
        num_examples: int | None,
        personal: dict[str, float] | None = None,
        own: dict[str, LoRAFactors] | None = None,
    ) -> LocalResult:
        """A client's result from what it uploads (:func:`fedlora.local.finish_upload`)."""
        return cls(
            upload.factors,
            loss,
            upload.importance,
            upload.kept,
            num_examples,
            upload.next_rank,
            personal or {},
            own,
        )


@dataclass(frozen=True)
class Failure:
    """A sampled client that did not deliver its result in a round, and why."""

    reason: str


@dataclass(frozen=True)
class Task:
    """One client's work in one round, as the server sends it."""

    client: ClientInfo
    round: int
    plan: LocalPlan
    base_from: int
    """Position among all merged base updates of the first of :attr:`base_deltas`."""
    base_deltas: list[dict[str, BaseDelta]]
    """Merged base updates this client has not received yet, oldest first (FLoRA); an engine
    whose clients share the server's base weights ignores them."""
    down_params: int
    attempt: int = 0
    """Which try of the round this is (a round with too few replies is tried again)."""


Execute: TypeAlias = Callable[[list[Task]], list["LocalResult | Failure"]]
"""An engine's way of running a round's tasks: a result or a failure per task, in order."""


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
    seconds: float | None = None
    """Wall time of the round: from planning to the evaluated result."""
    failed: dict[str, str] = field(default_factory=dict)
    """Sampled clients that did not deliver (in any try of the round), with the reason."""
    flagged: dict[str, str] = field(default_factory=dict)
    """Clients whose claims the server overrode rather than refused, with what they claimed and
    what it used (an example count other than the one fixed when the client joined, a weight
    capped, a name other than its slot's): they stay in the round, at what the server knows."""
    attempts: int = 1
    skipped: str | None = None
    """Why the round changed nothing (too few replies in every try), or None."""
    peak_memory_mb: float | None = None
    """The most CUDA memory the server's process held during the round (MiB; in-process, its
    clients train there too); None off CUDA."""

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
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.failed:
            out["failed"] = self.failed
        if self.flagged:
            out["flagged"] = self.flagged
        if self.attempts != 1:
            out["attempts"] = self.attempts
        if self.skipped is not None:
            out["skipped"] = self.skipped
        if self.peak_memory_mb is not None:
            out["peak_memory_mb"] = self.peak_memory_mb
        return out


@dataclass
class RunOutcome:
    """The final global result of a run (None: standalone has none)."""

    export: dict[str, LoRAFactors] | None
    export_error: float | None = None
    unmerged: dict[str, LoRAFactors] | None = None
    """What of ``export`` the server's base weights do not hold yet (None: all of it)."""


Snapshot: TypeAlias = tuple[dict[str, torch.Tensor], dict[str, Any]]
"""A run's state after a round: tensors, and metadata that JSON can hold."""

OnRound: TypeAlias = Callable[[RoundRecord, Snapshot], None]
"""Called after every round (round 0: the base model) with its record and the run's state."""


log = logging.getLogger("fedlora")

C = TypeVar("C", bound=ClientInfo)


def eval_due(cfg: RunConfig, t: int) -> bool:
    """Whether round ``t`` is evaluated: every ``eval.every`` rounds and the last."""
    return t == cfg.rounds or t % cfg.eval.every == 0


def sample_clients(clients: Sequence[C], fraction: float, generator: torch.Generator) -> list[C]:
    """``max(1, round(fraction · n))`` of ``clients`` without replacement, in registration order."""
    k = max(1, round(fraction * len(clients)))
    picked = (
        torch.randperm(len(clients), generator=generator, device=generator.device)[:k]
        .sort()
        .values.tolist()
    )
    return [clients[i] for i in picked]


@dataclass(frozen=True)
class EvalSet:
    """Another evaluation set (``eval.benchmark``, ``data.heldout_categories``): its metric
    prefix, examples and kind; ``rouge``: also Rouge-L on ``eval.rouge_samples`` of them."""

    name: str
    examples: list[Example]
    kind: TaskKind
    rouge: bool = False


class PartyModel:
    """The model a party works on: a client trains plans on it, the server merges into it and
    evaluates it. ``heldout`` is empty on a client that only trains."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cfg: RunConfig,
        kind: TaskKind,
        heldout: Sequence[Example] = (),
        progress: bool = True,
        eval_sets: Sequence[EvalSet] = (),
        base: MergedBase | None = None,
    ) -> None:
        self.model = model
        self.base = base if base is not None else MergedBase(model)
        """The merged base weights, exact in float32 whatever the compute dtype; ``base``: one
        that outlives this party model (a Flower node's, kept with its model)."""
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.kind = kind
        self.heldout = list(heldout)
        self.eval_sets = list(eval_sets)
        self.progress = progress
        self.pad_id = int(tokenizer.pad_token_id)
        self.shapes = adapters.target_shapes(model, cfg.model.targets)

    @property
    def device(self) -> torch.device:
        """Where the model computes."""
        return devices.device_of(self.model)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, then each benchmark's with its name as prefix."""
        e = self.cfg.eval
        metrics = evaluate(
            self.model,
            self.tokenizer,
            self.heldout,
            self.kind,
            batch_size=e.batch_size,
            max_length=self.cfg.model.max_length,
            rouge_samples=e.rouge_samples,
            max_new_tokens=e.max_new_tokens,
            progress=self.progress,
        )
        for extra in self.eval_sets:
            scores = evaluate(
                self.model,
                self.tokenizer,
                extra.examples,
                extra.kind,
                batch_size=e.batch_size,
                max_length=self.cfg.model.max_length,
                rouge_samples=e.rouge_samples if extra.rouge else 0,
                max_new_tokens=e.max_new_tokens,
                progress=self.progress,
                label=f"evaluate {extra.name}",
            )
            metrics.update({f"{extra.name}_{k}": v for k, v in scores.items()})
        return metrics

    def evaluate_with(self, factors: dict[str, LoRAFactors] | None) -> dict[str, float]:
        """Evaluate the base model with ``factors`` attached (scaling 1), or the bare base."""
        if not factors:
            return self.evaluate()
        peft_model = adapters.attach_factors(self.model, self.cfg.model.targets, factors)
        try:
            return self.evaluate()
        finally:
            self.model = adapters.detach(peft_model)

    def merge(self, deltas: dict[str, BaseDelta]) -> None:
        """``W ← W + ΔW`` for each named module, never rounded to the compute dtype
        (:class:`fedlora.precision.MergedBase`)."""
        self.base.merge(deltas)

    def train(
        self,
        client: Client,
        plan: LocalPlan,
        t: int,
        local: TrainConfig | None = None,
        state: ClientState | None = None,
    ) -> LocalResult:
        """Train one plan with the method's client hook (:mod:`fedlora.clients`): attach a fresh
        adapter of the plan's rank, load its start and frozen components, prepare, train, read
        the upload (and score the client's own model when the plan asks and this party holds a
        held-out set), detach; then privacy's clipping and noise, and the hook's last word.
        ``local`` overrides ``cfg.train``; ``state`` is the client's own across rounds."""
        return self.train_together([Job(client, plan, local, state)], t)[0]

    def train_together(self, jobs: Sequence[Job], t: int) -> list[LocalResult]:
        """Train several clients of round ``t`` at once on this model, each its own adapter
        (:func:`fedlora.train.train_fused`: one pass over the base for all of them), with
        every step :meth:`train` takes for one client, in the same order; each result is
        what :meth:`train` gives that client alone, to the compute dtype's rounding. With more
        than one job, the method's hook must fuse (:attr:`fedlora.clients.ClientHook.fuses`),
        no plan may hold frozen components, and the model must not compute in float16
        (:func:`fuses`)."""
        cfg = self.cfg
        together = len(jobs) > 1
        runs = []
        for job in jobs:
            local = job.local or cfg.train
            seed = derive_seed(cfg.seed, t, job.client.index)
            data = LazyEncoded(job.client.examples, self.tokenizer, cfg.model.max_length)
            steps = num_steps(local, len(data))
            session = Session(
                cfg,
                job.plan,
                t,
                job.client.alpha,
                seed,
                steps,
                tuple(self.shapes),
                job.state,
                job.client.cid if together else adapters.ADAPTER,
            )
            runs.append((job, local, data, session))
        if together and not self.fuses([job.plan for job in jobs]):
            raise ValueError("train_together: these clients train one at a time (fuses())")
        opened = open_adapters(self.model, [run[3] for run in runs], together)
        model = opened.model
        uploads = []
        personals: list[dict[str, float]] = []
        owns: list[dict[str, LoRAFactors] | None] = []
        try:
            label = None
            if self.progress:
                names = ", ".join(f"{j.client.cid} (r={j.plan.rank})" for j, *_ in runs)
                label = f"round {t} {names}"
            if together:
                members = [
                    Member(s.adapter, data, local, s.seed, adapters.trainable(model, s.adapter))
                    for _, local, data, s in runs
                ]
                trained = train_fused(model, members, self.pad_id, label)
            else:
                _, local, data, session = runs[0]
                callbacks = opened.callbacks[0]
                trained = [
                    train_local(model, data, local, self.pad_id, session.seed, label, callbacks)
                ]
            for (job, *_), hook in zip(runs, opened.hooks, strict=True):
                upload = hook.read(model)
                scored = job.plan.score and bool(self.heldout)
                uploads.append(upload)
                personals.append(self.evaluate() if scored else {})
                owns.append(upload.factors if scored else None)
        finally:
            self.model = adapters.detach(model)
        results = []
        for (job, *_), hook, upload, before, result, personal, own in zip(
            runs, opened.hooks, uploads, opened.befores, trained, personals, owns, strict=True
        ):
            upload = finish_upload(hook, upload, before, job.client.index)
            loss = None if privacy.withholds(cfg.privacy) else result.loss
            results.append(LocalResult.of(upload, loss, len(job.client.examples), personal, own))
        return results

    def fuses(self, plans: Sequence[LocalPlan]) -> bool:
        """Whether clients with ``plans`` can train together on this model
        (:meth:`train_together`): the method's hook fuses, no plan holds frozen components, and
        the model does not compute in float16 (loss scaling is per client). Whether they do is
        ``train.fuse``'s."""
        return (
            hook_for(self.cfg.strategy).fuses
            and not any(p.frozen for p in plans)
            and not computes_in_float16(self.model)
        )


@dataclass(frozen=True)
class Job:
    """One client's local training in a round (:meth:`PartyModel.train_together`)."""

    client: Client
    plan: LocalPlan
    local: TrainConfig | None = None
    """Overrides ``cfg.train`` (a straggler's fewer steps)."""
    state: ClientState | None = None
    """The client's own state across rounds."""


class FederatedRounds:
    """The server side of federated rounds with one strategy, whatever carries the messages.

    Holds the strategy's state, the client sampler, each client's current rank (HetLoRA's pruning
    persists) and, for strategies that merge into the base, every merged update and how many of
    them each client has received. ``party`` is the server's model: merged into, and evaluated.
    """

    def __init__(
        self,
        cfg: RunConfig,
        strategy: Strategy,
        clients: Sequence[ClientInfo],
        shapes: dict[str, tuple[int, int]],
        model_params: int,
        party: PartyModel,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.clients = list(clients)
        self.shapes = dict(shapes)
        self.model_params = model_params
        self.party = party
        self.sampler = seeds.generator(cfg.seed, seeds.SAMPLER)
        self.ranks = {c.cid: c.rank for c in self.clients}
        """Each client's current rank (HetLoRA's self-pruning lowers it)."""
        init_gen = seeds.generator(cfg.seed, seeds.SHARED_INIT)
        self.state = strategy.init_state(shapes, max(c.rank for c in self.clients), init_gen)
        self.hook = hook_for(strategy.name)
        self.merged: list[dict[str, BaseDelta]] = []
        self.received = {c.cid: 0 for c in self.clients}
        """How many of :attr:`merged` each client has received."""
        self.examples = {c.cid: len(c.examples) for c in self.clients if isinstance(c, Client)}
        """Each client's example count, fixed when it joins: the partition the server gave it
        (in-process), or its first report (a Flower node with its own data); what it reports
        later does not change its weight."""
        self.assigned = set(self.examples)
        """The clients whose count the server assigned (it made their partitions): never capped,
        so a skewed partition keeps the weight the method gives it."""
        self._started = time.perf_counter()
        self.done = 0
        """Rounds finished."""
        self.flags: dict[str, str] = {}
        """Claims overridden since the last record (:meth:`flag`), for the next one."""

    def flag(self, cid: str, why: str) -> None:
        """Note that client ``cid`` claimed something the server overrode (``why``); the next
        round record carries it (:attr:`RoundRecord.flagged`), so ``metrics.jsonl`` names it."""
        log.warning("client %s: %s", cid, why)
        self.flags[cid] = why

    def start(self) -> RoundRecord:
        """Round 0: the base model's metrics."""
        return RoundRecord(0, self.party.evaluate())

    def run_round(self, t: int, execute: Execute) -> RoundRecord:
        """Round ``t``: plan, ``execute`` (the engine), aggregate over the clients that delivered.
        With fewer than ``clients.min_clients`` of them, the round is tried again with a fresh
        sample up to ``clients.retries`` times, then skipped; the record says which clients
        failed and why."""
        self.begin()
        return self.close(self._run_round(t, execute))

    def begin(self) -> None:
        """A round starts: its clock, and the device's peak-memory window."""
        self._started = time.perf_counter()
        devices.reset_peak_memory(self.party.device)

    def close(self, record: RoundRecord) -> RoundRecord:
        """A round's ``record`` with the device's peak memory since :meth:`begin` and the claims
        overridden since the last record (:meth:`flagging`)."""
        record.peak_memory_mb = devices.peak_memory_mb(self.party.device)
        return self.flagging(record)

    def _run_round(self, t: int, execute: Execute) -> RoundRecord:
        failed: dict[str, str] = {}
        need = self.cfg.clients.min_clients
        for attempt in range(self.cfg.clients.retries + 1):
            tasks = self.tasks(t, attempt)
            record = self.conclude(tasks, execute(tasks), failed)
            if record is not None:
                return record
        reason = (
            f"fewer than clients.min_clients = {need} clients delivered in each of "
            f"{self.cfg.clients.retries + 1} tries"
        )
        return self.skipped(t, failed, self.cfg.clients.retries + 1, reason)

    def conclude(
        self,
        tasks: Sequence[Task],
        results: Sequence[LocalResult | Failure],
        failed: dict[str, str],
    ) -> RoundRecord | None:
        """One try of a round, once its ``tasks`` have their ``results``: screen them, aggregate
        the clients that delivered (one that aggregation finds at fault fails, the rest go on)
        and :meth:`finish`. None while fewer than ``clients.min_clients`` delivered (the caller
        tries again or :meth:`skipped`); ``failed`` gains every client that failed, with why."""
        t, attempt = tasks[0].round, tasks[0].attempt
        need = self.cfg.clients.min_clients
        screened = self.screened(tasks, results)
        lost = {
            task.client.cid: r.reason
            for task, (r, _) in zip(tasks, screened, strict=True)
            if isinstance(r, Failure)
        }
        failed.update(lost)
        for cid, reason in lost.items():
            log.warning("round %d: client %s failed: %s", t, cid, reason)
        done = [
            (task, r, u)
            for task, (r, u) in zip(tasks, screened, strict=True)
            if isinstance(r, LocalResult) and u is not None
        ]
        state = None
        while len(done) >= need and state is None:
            try:
                state = self.aggregated([d[2] for d in done])
            except UpdateError as exc:
                if exc.client not in {d[0].client.cid for d in done}:
                    return self.skipped(t, failed, attempt + 1, str(exc))
                failed[exc.client] = f"rejected in aggregation: {exc}"
                log.warning("round %d: client %s failed: %s", t, exc.client, exc)
                done = [d for d in done if d[0].client.cid != exc.client]
        if state is None:
            log.warning(
                "round %d, try %d: %d of %d clients delivered, clients.min_clients = %d",
                t,
                attempt + 1,
                len(done),
                len(tasks),
                need,
            )
            return None
        record = self.finish(
            [d[0] for d in done], [d[1] for d in done], [d[2] for d in done], state
        )
        record.failed, record.attempts = failed, attempt + 1
        return record

    def skipped(self, t: int, failed: dict[str, str], attempts: int, reason: str) -> RoundRecord:
        """Round ``t`` without an update to the global state, and why."""
        log.warning("round %d skipped: %s", t, reason)
        self.done = t
        return RoundRecord(
            t,
            self._metrics(t),
            failed=failed,
            attempts=attempts,
            skipped=reason,
            seconds=time.perf_counter() - self._started,
        )

    def aggregated(self, updates: Sequence[ClientUpdate]) -> GlobalState:
        """The strategy's next state from ``updates``, checked finite before anything applies it;
        an :class:`UpdateError` naming a client where the strategy finds one at fault (the round
        then goes on without it), or naming none for a non-finite aggregate."""
        state = self.strategy.aggregate(self.state, updates)
        for kind, parts in (("factors", state.factors), ("base_delta", state.base_delta)):
            for module, value in parts.items():
                tensors = (value.A, value.B) if isinstance(value, LoRAFactors) else (value,)
                if not all(bool(torch.isfinite(x).all()) for x in tensors):
                    raise UpdateError(
                        f"the aggregate's {kind} is not finite; the global state is kept",
                        module=module,
                    )
        return state

    def update_of(self, task: Task, local: LocalResult) -> ClientUpdate:
        """The update a client's result makes, as the strategy will see it: its example count
        the one fixed when it joined (:attr:`examples`), capped (:meth:`weighed_examples`)."""
        index = self.strategy.component_indices(self.state, task.plan.rank)
        if index is not None:  # pruning keeps the first components of each
            index = {n: i[: local.factors[n].rank] for n, i in index.items() if n in local.factors}
        return ClientUpdate(
            task.client.cid,
            local.factors,
            self.weighed_examples(task.client.cid),
            {} if local.loss is None else {"loss": local.loss},
            component_index=index,
            importance=local.importance,
        )

    def weighed_examples(self, cid: str) -> int:
        """The example count client ``cid`` is weighed by: the one fixed when it joined; where
        the client reported it (the server did not assign it), at most
        ``validation.weight_ratio`` times the median count of the clients the server knows."""
        n = self.examples[cid]
        ratio = self.cfg.validation.weight_ratio
        if ratio is None or cid in self.assigned:
            return n
        cap = max(1, math.floor(ratio * statistics.median(self.examples.values())))
        if n > cap:
            self.flag(cid, f"joined with {n} examples; weighed by {cap} (validation.weight_ratio)")
        return min(n, cap)

    def screen(self, task: Task, result: LocalResult | Failure) -> LocalResult | Failure:
        """A result, or a :class:`Failure` with the reason where its update is not what the
        server expects, so that it never reaches the global state (:func:`screen_update`). The
        example count it reports is checked, then fixed for good the first time
        (:attr:`examples`)."""
        if isinstance(result, Failure):
            return result
        v = self.cfg.validation
        expected = Expected(self.shapes, task.plan.rank, torch.float32, v.max_norm, v.max_examples)
        cid = task.client.cid
        reported = result.num_examples
        try:
            count = self.examples[cid] if reported is None else reported
            screen_update(ClientUpdate(cid, result.factors, count), expected)
        except UpdateError as exc:
            return Failure(f"rejected update: {exc}")
        for name, k in result.kept.items():
            if name not in result.factors or not 0 <= k <= result.factors[name].rank:
                return Failure(
                    f"rejected update: client {cid!r}: kept[{name!r}] = {k} does not fit its "
                    "factors (a module it sent, 0 … its rank)"
                )
        if result.next_rank is not None and not 1 <= result.next_rank <= task.plan.rank:
            return Failure(
                f"rejected update: client {cid!r}: next_rank {result.next_rank} is outside "
                f"1 … {task.plan.rank} (a client may shrink its rank, never grow it)"
            )
        known = self.examples.setdefault(cid, count)
        if reported is not None and reported != known:
            self.flag(cid, f"reported {reported} examples; weighed by the {known} it joined with")
        return result

    def screened(
        self, tasks: Sequence[Task], results: Sequence[LocalResult | Failure]
    ) -> list[tuple[LocalResult | Failure, ClientUpdate | None]]:
        """Each task's result screened (:meth:`screen`), with its update once every reply's
        count is known (the cap is relative to them), then screened by norm
        (:meth:`screen_norms`)."""
        checked = [self.screen(task, r) for task, r in zip(tasks, results, strict=True)]
        return self.screen_norms(
            [
                (r, None if isinstance(r, Failure) else self.update_of(task, r))
                for task, r in zip(tasks, checked, strict=True)
            ]
        )

    def screen_norms(
        self, screened: list[tuple[LocalResult | Failure, ClientUpdate | None]]
    ) -> list[tuple[LocalResult | Failure, ClientUpdate | None]]:
        """The round's screened results, a client whose ``‖B A‖_F / √r`` in some module is more
        than ``validation.norm_ratio`` times that module's median over the round's updates now a
        :class:`Failure` naming the module (from 3 updates on: with 2, the median is their
        mean). Per component (``/ √r``, ``r`` the update's rank), so that honest clients of
        ranks 64 and 4 in one round (whose products grow with the rank) stay comparable. A
        module whose median is 0 (most clients left it unchanged: AdaLoRA's pruning) has no
        relative bound."""
        ratio = self.cfg.validation.norm_ratio
        updates = [u for _, u in screened if u is not None]
        if ratio is None or len(updates) < 3:
            return screened
        norms = {
            u.client_id: {m: update_norm(f) / math.sqrt(f.rank) for m, f in u.factors.items()}
            for u in updates
        }
        medians = {
            m: statistics.median(n[m] for n in norms.values() if m in n)
            for m in {m for n in norms.values() for m in n}
        }
        out: list[tuple[LocalResult | Failure, ClientUpdate | None]] = []
        for result, update in screened:
            over = (
                None
                if update is None
                else next(
                    (
                        (m, norm)
                        for m, norm in sorted(norms[update.client_id].items())
                        if medians[m] > 0 and norm > ratio * medians[m]
                    ),
                    None,
                )
            )
            if over is None:
                out.append((result, update))
                continue
            m, norm = over
            error = UpdateError(
                f"‖B A‖_F / √r = {norm:.4g} is more than validation.norm_ratio = {ratio:g} "
                f"times the round's median {medians[m]:.4g}",
                client=update.client_id if update is not None else None,
                module=m,
            )
            out.append((Failure(f"rejected update: {error}"), None))
        return out

    def due(self, t: int) -> bool:
        return eval_due(self.cfg, t)

    def _metrics(self, t: int) -> dict[str, float]:
        """The global model's held-out metrics when round ``t`` is due for evaluation."""
        return self.party.evaluate_with(dict(self.state.factors)) if self.due(t) else {}

    def tasks(self, t: int, attempt: int = 0) -> list[Task]:
        """Sample round ``t``'s clients and plan each one's local work."""
        strategy, traits, cfg = self.strategy, self.strategy.traits, self.cfg
        sampled = sample_clients(self.clients, cfg.clients.fraction, self.sampler)
        due = self.due(t)
        ranks = [self.ranks[c.cid] for c in sampled]
        starts = strategy.redistribute(self.state, ranks)
        options = strategy.client_options(self.state)
        tasks = []
        for client, rank, start in zip(sampled, ranks, starts, strict=True):
            frozen = strategy.frozen_components(self.state, rank)
            plan = LocalPlan(rank, start, frozen, options, score=self.hook.keeps_state and due)
            first = self.received[client.cid]
            pending = self.merged[first:]
            parts = self.hook.received(options) or (("B",) if traits.fixed_a else ("A", "B"))
            down = (
                factor_params(start, parts)
                + factor_params(plan.frozen)
                + sum(delta_params(d) for d in pending)
            )
            tasks.append(Task(client, t, plan, first, pending, down, attempt))
        return tasks

    def finish(
        self,
        tasks: Sequence[Task],
        results: Sequence[LocalResult],
        updates: Sequence[ClientUpdate],
        state: GlobalState,
    ) -> RoundRecord:
        """Apply one round's aggregate ``state`` (of the screened ``updates``, in the order of
        ``tasks``), merge, evaluate, record. Engines call :meth:`run_round`, which calls this
        with the clients that delivered and their :meth:`aggregated` state."""
        traits = self.strategy.traits
        t = tasks[0].round
        traffic = []
        for task, local in zip(tasks, results, strict=True):
            client = task.client
            up = self.hook.upload_params(local.factors, task.plan)
            traffic.append(
                Traffic(
                    client.cid,
                    task.plan.rank,
                    up,
                    task.down_params,
                    BYTES_PER_PARAM,
                    self.model_params,
                )
            )
            self.received[client.cid] = len(self.merged)
            if local.next_rank is not None:  # a pruned rank stays pruned
                self.ranks[client.cid] = local.next_rank
        self.state = state
        if traits.merges_into_base:
            self.party.merge(dict(self.state.base_delta))
            self.merged.append(dict(self.state.base_delta))
        metrics = self._metrics(t)
        metrics.update(_mean_of("personal_local_", [r.personal for r in results if r.personal]))
        metrics.update(_mean_of("personal_", self._after_broadcast(results)))
        losses = [r.loss for r in results if r.loss is not None]
        train_loss = sum(losses) / len(losses) if losses else None
        record = RoundRecord(t, metrics, train_loss, [task.client.cid for task in tasks], traffic)
        if self.hook.shrinks_rank:
            record.rank_sum_before = sum(task.plan.rank for task in tasks)
            record.rank_sum_after = sum(r.mean_rank for r in results)
        record.seconds = time.perf_counter() - self._started
        self.done = t
        return record

    def _after_broadcast(self, results: Sequence[LocalResult]) -> list[dict[str, float]]:
        """Each scored client's model as FedSA-LoRA's official code evaluates it: after the
        server's broadcast, the new ``Ā`` with the client's own ``B_k``."""
        scores = []
        for r in results:
            if r.own is None:
                continue
            shared = self.state.factors
            mine = {m: LoRAFactors(A=shared[m].A.to(f.B.dtype), B=f.B) for m, f in r.own.items()}
            scores.append(self.party.evaluate_with(mine))
        return scores

    def drive(
        self,
        execute: Execute,
        on_round: OnRound,
        resume: Snapshot | None = None,
        *,
        clients_hold_nothing: bool = False,
        rounds: Callable[[int], Iterable[int]] | None = None,
        after: Callable[[RoundRecord], None] | None = None,
    ) -> RunOutcome:
        """The whole run, on any engine: round 0 (or the state of ``resume``), every round
        through ``execute`` with ``on_round`` after each (the run folder's row and checkpoint),
        then the export. ``clients_hold_nothing``: the clients of a resumed run start without
        the merged updates they had received (a new Flower run's nodes), so each is sent all of
        them. ``rounds(first)``: the rounds to run from ``first`` (a progress bar); ``after``:
        called with each round's record once it is checkpointed."""
        if resume is None:
            on_round(self.flagging(self.start()), self.snapshot())
        else:
            self.restore(*resume)
            if clients_hold_nothing:
                self.received = dict.fromkeys(self.received, 0)
        first = self.done + 1
        for t in rounds(first) if rounds else range(first, self.cfg.rounds + 1):
            record = self.run_round(t, execute)
            on_round(record, self.snapshot())
            if after is not None:
                after(record)
        factors, err = self.export()
        return RunOutcome(factors, err, self.unmerged())

    def flagging(self, record: RoundRecord) -> RoundRecord:
        """``record`` with the claims overridden since the last one (:meth:`flag`)."""
        record.flagged.update(self.flags)
        self.flags.clear()
        return record

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to go on after the last finished round (:mod:`fedlora.checkpoint`)."""
        tensors: dict[str, torch.Tensor] = {"sampler": self.sampler.get_state()}
        put_deltas(tensors, "factors", self.state.factors)
        put_deltas(tensors, "base_delta", self.state.base_delta)
        for name, score in self.state.importance.items():
            tensors[f"importance/{name}"] = score
        for i, delta in enumerate(self.merged):
            put_deltas(tensors, f"merged/{i}", delta)
        meta = {
            "mode": self.strategy.name,
            "round": self.done,
            "state_round": self.state.round,
            "merged": len(self.merged),
            "ranks": dict(self.ranks),
            "received": dict(self.received),
            "examples": dict(self.examples),
        }
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from :meth:`snapshot`; merges the merged updates into the server's model
        (pristine when this is called) in their order, as the uninterrupted run did."""
        prefix = "importance/"
        self.state = GlobalState(
            factors=take_factors(tensors, "factors"),
            base_delta=take_deltas(tensors, "base_delta"),
            round=int(meta["state_round"]),
            importance={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
        )
        self.merged = [take_deltas(tensors, f"merged/{i}") for i in range(int(meta["merged"]))]
        for delta in self.merged:
            self.party.merge(delta)
        self.sampler.set_state(tensors["sampler"])
        self.ranks = {str(k): int(v) for k, v in meta["ranks"].items()}
        self.received = {str(k): int(v) for k, v in meta["received"].items()}
        self.examples.update({str(k): int(v) for k, v in meta.get("examples", {}).items()})
        self.done = int(meta["round"])

    def export(self) -> tuple[dict[str, LoRAFactors], float | None]:
        """The global result: the accumulated merged updates with the global adapter, if any,
        for a strategy that merges into the base (exact, or at ``export_rank``), else the global
        adapter."""
        if self.strategy.traits.merges_into_base:
            parts: list[dict[str, BaseDelta]] = list(self.merged)
            if self.state.factors:
                parts.append(dict(self.state.factors))
            return accumulated_factors(parts, self.cfg.export_rank)
        return dict(self.state.factors), None

    def unmerged(self) -> dict[str, LoRAFactors]:
        """The part of the global result not yet in the server's base weights: the global
        adapter (FLoRA: none, FedEx-LoRA: ``B̄ Ā``)."""
        return dict(self.state.factors)


def accumulated_factors(
    merged: Sequence[dict[str, BaseDelta]], export_rank: int | None
) -> tuple[dict[str, LoRAFactors], float | None]:
    """FLoRA's total update ``Σ_t ΔW_t`` per module as factors: exact (stacked over rounds), or
    compressed to ``export_rank`` by SVD with the largest relative Frobenius error returned."""
    from fedlora.linalg import stack, svd_factors, truncate

    out: dict[str, LoRAFactors] = {}
    worst = 0.0
    names = list(merged[0]) if merged else []
    for name in names:
        parts = [dense_as_factors(d[name]) for d in merged]
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


def dense_as_factors(delta: BaseDelta) -> LoRAFactors:
    """A base delta as factors: factored ones as they are, a dense ``(d_out, d_in)`` one as exact
    factors ``U S`` and ``Vh``."""
    if isinstance(delta, LoRAFactors):
        return delta
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return LoRAFactors(A=Vh.contiguous(), B=(U * S).contiguous())


def _mean_of(prefix: str, scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """``{prefix + key: mean over scores}`` (the clients' mean of each metric)."""
    if not scores:
        return {}
    return {f"{prefix}{k}": sum(s[k] for s in scores) / len(scores) for k in scores[0]}

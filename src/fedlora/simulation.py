"""The in-process runner: rounds, client sampling, local training, aggregation, evaluation.

It only moves data along the path ``redistribute → train → aggregate → (merge) → evaluate`` and
acts on each strategy's traits; all math lives in :mod:`fedlora.strategies`. ``centralized``
(all client data pooled, one LoRA) and ``standalone`` (every client alone; the mean is reported)
are the reference points. Per-client state that outlives a round (standalone adapters) is kept
on disk as safetensors, so memory does not grow with the number of registered clients.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fedlora import seeds
from fedlora.checkpoint import put_deltas, take_factors
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.federation import Federation, server_party, server_rounds
from fedlora.lora import LoRAFactors
from fedlora.models import load_configured
from fedlora.rounds import (
    Client,
    Failure,
    FederatedRounds,
    Job,
    LocalPlan,
    LocalResult,
    OnRound,
    PartyModel,
    RoundRecord,
    RunOutcome,
    Snapshot,
    Task,
    eval_due,
    sample_clients,
)
from fedlora.train import num_steps, tokens_per_pass

log = logging.getLogger("fedlora")


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
        self.party = server_party(fed.cfg, fed.loaded, fed.heldout, fed.kind, progress, fed.scored)
        self.states: AdapterStore | None = None
        """Each client's own state across rounds, for a hook that keeps one."""
        self.server: FederatedRounds | None = None
        self.quantized: dict[str, tuple[PartyModel, list[int]]] = {}
        """Per quantization of some client: the model those clients train on (loaded on first
        use) and how many of the server's merged updates it holds."""
        self._logged_pass = 0
        """The fused group size last logged (logged again only when it changes)."""

    def party_of(self, index: int) -> PartyModel:
        """The model client ``index`` trains on: the server's, or one loaded in the client's
        quantization, holding every merged update so far as float32 terms beside its quantized
        weights (the same deltas the server merged, in the same order)."""
        q = self.cfg.clients.quantization_of(index)
        if q == "none":
            return self.party
        if q not in self.quantized:
            loaded = load_configured(self.cfg.model, self.cfg.seed, q)
            fed = self.fed  # the server's sets, for a hook that scores each client's own model
            party = server_party(fed.cfg, loaded, fed.heldout, fed.kind, False, fed.scored)
            self.quantized[q] = (party, [0])
        party, held = self.quantized[q]
        merged = self.server.merged if self.server is not None else []
        for delta in merged[held[0] :]:
            party.merge(delta)
        held[0] = len(merged)
        return party

    @property
    def model(self) -> Any:
        return self.party.model

    @property
    def tokenizer(self) -> Any:
        return self.party.tokenizer

    def rounds(self, first: int = 1) -> Any:
        return tqdm(
            range(first, self.cfg.rounds + 1),
            desc=self.cfg.label,
            disable=not self.progress,
            initial=first - 1,
            total=self.cfg.rounds,
        )

    def due(self, t: int) -> bool:
        return eval_due(self.cfg, t)

    def run(self, on_round: OnRound, resume: Snapshot | None = None) -> RunOutcome:
        if resume is not None and resume[1].get("mode") != self.cfg.label:
            raise ConfigError(
                f"the checkpoint is of a {resume[1].get('mode')!r} run, not {self.cfg.label!r}"
            )
        if self.cfg.mode == "centralized":
            return self.run_centralized(on_round, resume)
        if self.cfg.mode == "standalone":
            return self.run_standalone(on_round, resume)
        return self.run_federated(on_round, resume)

    def run_federated(self, on_round: OnRound, resume: Snapshot | None = None) -> RunOutcome:
        """The rounds of :class:`fedlora.rounds.FederatedRounds`, each client trained here in
        turn on the shared model (so merged base updates are already in it)."""
        fed = self.fed
        server = self.server = server_rounds(self.cfg, fed.clients, self.party, fed.model_params)
        after = None
        if server.hook.keeps_state:  # each client's own state, as of the checkpoint's round
            states = self.states = AdapterStore(self.workdir / "clients")
            states.forget_after(int(resume[1]["round"]) if resume else 0)

            def after(record: RoundRecord) -> None:
                states.prune(record.round)

        return server.drive(self.execute, on_round, resume, rounds=self.rounds, after=after)

    def execute(self, tasks: list[Task]) -> list[LocalResult | Failure]:
        """Train each task's client here, with the faults of ``[faults]`` injected: one at a
        time, or, with ``train.fuse`` where the method allows it, the clients that share a
        model in groups of up to ``train.fuse_tokens`` tokens a pass
        (:meth:`fedlora.rounds.PartyModel.train_together`)."""
        out: dict[int, LocalResult | Failure] = {}
        faults: dict[int, str | None] = {}
        groups: dict[str, list[tuple[int, Job]]] = {}
        for i, task in enumerate(tasks):
            client = self.fed.clients[task.client.index]
            fault = faults[i] = injected_fault(self.cfg, task)
            if fault == "crash_before":
                out[i] = Failure("injected fault: crashed before training")
                continue
            local = None
            if fault == "straggler":
                steps = num_steps(self.cfg.train, len(client.examples))
                work = max(1, int(self.cfg.faults.straggler_work * steps))
                local = dataclasses.replace(self.cfg.train, steps=work, epochs=None)
            state = None
            if self.states is not None:
                state = StoredState(self.states, client.cid, task.round)
            job = Job(client, task.plan, local, state)
            quantization = self.cfg.clients.quantization_of(client.index)
            groups.setdefault(quantization, []).append((i, job))
        for quantization, jobs in groups.items():
            party = self.party_of(jobs[0][1].client.index)
            # a quantized base's LoRA layers are bitsandbytes': trained one at a time
            fused = (
                self.cfg.train.fuse
                and quantization == "none"
                and party.fuses([j.plan for _, j in jobs])
            )
            size = self._clients_per_pass(party) if fused else 1
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                t = tasks[chunk[0][0]].round
                for (i, _), result in zip(
                    chunk, party.train_together([j for _, j in chunk], t), strict=True
                ):
                    out[i] = result
        for i in range(len(tasks)):
            if faults[i] == "crash_after":
                out[i] = Failure("injected fault: crashed after training, before replying")
            elif faults[i] == "timeout":
                out[i] = Failure("injected fault: no reply before the round closed")
        return [out[i] for i in range(len(tasks))]

    def _clients_per_pass(self, party: PartyModel) -> int:
        """How many clients one fused pass on ``party``'s model carries: as many micro-batches
        (``batch_size × max_length`` tokens each) as :func:`fedlora.train.tokens_per_pass`
        allows (``train.fuse_tokens`` and the device's memory), at least one."""
        cfg = self.cfg
        tokens = tokens_per_pass(
            party.model, cfg.train, cfg.model.max_length, cfg.model.gradient_checkpointing
        )
        size = max(1, tokens // (cfg.train.batch_size * cfg.model.max_length))
        if size != self._logged_pass:
            log.info("fused training: up to %d clients a pass (%d tokens)", size, tokens)
            self._logged_pass = size
        return size

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
            on_round(RoundRecord(0, self.party.evaluate()), snapshot(0, None))
        else:
            factors = take_factors(resume[0], "factors") or None
            first = int(resume[1]["round"]) + 1
        for t in self.rounds(first):
            result = self.party.train(central, LocalPlan(rank, factors), t, local)
            factors = result.factors
            metrics = self.party.evaluate_with(factors) if self.due(t) else {}
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
            on_round(RoundRecord(0, self.party.evaluate()), snapshot(0))
        else:
            sampler.set_state(resume[0]["sampler"])
            first = int(resume[1]["round"]) + 1
        store.forget_after(first - 1)
        for t in self.rounds(first):
            sampled = sample_clients(self.fed.clients, self.cfg.clients.fraction, sampler)
            per_client: list[dict[str, float]] = []
            losses: list[float] = []
            for client in sampled:
                start = store.load(client.cid)
                result = self.party.train(client, LocalPlan(client.rank, start), t)
                store.save(client.cid, t, result.factors)
                if result.loss is not None:  # privacy is refused here, so never None
                    losses.append(result.loss)
                if self.due(t):
                    per_client.append(self.party.evaluate_with(result.factors))
            metrics = (
                {k: sum(m[k] for m in per_client) / len(per_client) for k in per_client[0]}
                if per_client
                else {}
            )
            train_loss = sum(losses) / len(losses) if losses else None
            record = RoundRecord(t, metrics, train_loss, [c.cid for c in sampled])
            on_round(record, snapshot(t))
            store.prune(t)
        return RunOutcome(None)


def injected_fault(cfg: RunConfig, task: Task) -> str | None:
    """The fault ``[faults]`` injects into ``task`` (``crash_before``, ``crash_after``,
    ``timeout``, ``straggler``) or None; one uniform draw seeded by (seed, round, try, client)."""
    f = cfg.faults
    gen = seeds.generator(cfg.seed, seeds.FAULTS, task.round, task.attempt, task.client.index)
    u = float(torch.rand(1, generator=gen, device=gen.device))
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

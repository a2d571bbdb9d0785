"""FedSA-LoRA: A is averaged and comes down; every client keeps its own B across rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODULES, make_updates
from fedlora import adapters
from fedlora.clients import LocalPlan, Session
from fedlora.config import load_config
from fedlora.experiment import run_experiment
from fedlora.federation import build_federation, server_party
from fedlora.lora import LoRAFactors
from fedlora.methods import get_strategy, hook_for
from fedlora.models import build_tiny
from fedlora.weighting import client_weights

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
TARGETS = ["q_proj", "v_proj"]


def test_the_server_averages_a_and_the_global_model_holds_the_mean_b() -> None:
    updates = make_updates([4, 4, 4], seed=2)
    weights = client_weights(updates)
    state = get_strategy("fedsa").aggregate(
        get_strategy("fedsa").init_state(MODULES, 4, torch.Generator().manual_seed(0)), updates
    )
    for m in MODULES:
        mean_a = sum(p * u.factors[m].A for p, u in zip(weights, updates, strict=True))
        mean_b = sum(p * u.factors[m].B for p, u in zip(weights, updates, strict=True))
        torch.testing.assert_close(state.factors[m].A, mean_a)
        torch.testing.assert_close(state.factors[m].B, mean_b)


class MemoryState:
    def __init__(self, factors: dict[str, LoRAFactors] | None = None) -> None:
        self.factors = factors
        self.saved: list[dict[str, LoRAFactors]] = []

    def load(self) -> dict[str, LoRAFactors] | None:
        return self.factors

    def save(self, factors: dict[str, LoRAFactors]) -> None:
        self.saved.append(factors)


def _prepared(state: MemoryState) -> tuple[dict[str, LoRAFactors], dict[str, LoRAFactors]]:
    """The factors a fedsa client trains from, given the server's start and its own state."""
    model, _ = build_tiny(seed=0)
    cfg = load_config(TINY, ["strategy=fedsa", "clients.ranks=[4]"])
    shapes = adapters.target_shapes(model, TARGETS)
    gen = torch.Generator().manual_seed(3)
    start = {
        n: LoRAFactors(
            A=torch.randn(4, d_in, generator=gen), B=torch.randn(d_out, 4, generator=gen)
        )
        for n, (d_out, d_in) in shapes.items()
    }
    session = Session(cfg, LocalPlan(4, start), 2, 8.0, 1, 1, tuple(shapes), state)
    hook = hook_for("fedsa")(session)
    peft_model = hook.attach(model)
    adapters.write_factors(peft_model, start)  # as PartyModel.train loads the start
    hook.prepare(peft_model)
    hook.read(peft_model)
    got = adapters.read_factors(peft_model)
    adapters.detach(peft_model)
    return start, got


def test_a_client_trains_the_servers_a_with_its_own_b_and_keeps_what_it_trained() -> None:
    model, _ = build_tiny(seed=0)
    shapes = adapters.target_shapes(model, TARGETS)
    gen = torch.Generator().manual_seed(9)
    own = {
        n: LoRAFactors(
            A=torch.randn(4, d_in, generator=gen), B=torch.randn(d_out, 4, generator=gen)
        )
        for n, (d_out, d_in) in shapes.items()
    }
    state = MemoryState(own)

    start, got = _prepared(state)

    for n in shapes:
        torch.testing.assert_close(got[n].A, start[n].A)  # the server's Ā
        torch.testing.assert_close(got[n].B, own[n].B)  # never the start's B̄
    assert len(state.saved) == 1 and set(state.saved[0]) == set(shapes)


def test_a_clients_first_round_starts_from_b_zero() -> None:
    state = MemoryState(None)
    start, got = _prepared(state)
    for n, f in got.items():
        torch.testing.assert_close(f.A, start[n].A)
        assert torch.count_nonzero(f.B) == 0


def test_only_a_comes_down_and_both_go_up() -> None:
    hook = hook_for("fedsa")
    assert hook.received({}) == ("A",) and hook.sent({}) == ("A", "B") and hook.keeps_state


@pytest.mark.runner
def test_a_tiny_run_keeps_each_clients_b_on_disk_and_scores_it(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["strategy=fedsa", "rounds=3", "clients.ranks=[4]"])
    run_experiment(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    files = sorted((tmp_path / "run" / "clients").glob("*.safetensors"))
    # one file per client, its newest: memory and disk flat in the number of rounds
    assert [f.name for f in files] == [f"client-000{k}.r3.safetensors" for k in range(3)]
    own = [load_file(str(f)) for f in files]
    b_keys = [k for k in own[0] if k.endswith("/B")]
    assert b_keys and not torch.equal(own[0][b_keys[0]], own[1][b_keys[0]])  # each its own B
    shapes = adapters.target_shapes(build_tiny(seed=0)[0], TARGETS).values()
    a_only = sum(4 * d_in for _, d_in in shapes)
    both = sum(4 * (d_in + d_out) for d_out, d_in in shapes)
    for row in rows[1:]:
        assert "eval_personal_loss" in row and "eval_loss" in row
        for t in row["traffic"]:
            assert t["down_params"] == a_only and t["up_params"] == both
    # the personalised models are each client's own, not the global (Ā, B̄)
    assert rows[-1]["eval_personal_loss"] != pytest.approx(rows[-1]["eval_loss"])
    # as the official code scores them, after the broadcast: the new Ā with each own B_k, which
    # is not the client's model right after training, (A_k, B_k)
    last = rows[-1]
    assert last["eval_personal_local_loss"] != pytest.approx(last["eval_personal_loss"])
    shared = adapters.read_adapter(tmp_path / "run" / "adapter")  # (Ā, B̄) of the last round
    fed = build_federation(cfg)
    party = server_party(cfg, fed.loaded, fed.heldout, fed.kind, False, fed.scored)
    scores = []
    for file in own:
        mine = {
            m: LoRAFactors(A=f.A, B=file[f"factors/{m}/B"].to(f.B.dtype)) for m, f in shared.items()
        }
        scores.append(party.evaluate_with(mine)["loss"])
    assert last["eval_personal_loss"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)

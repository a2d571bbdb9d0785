"""Fused local training (``train.fuse``): a round's clients train together, each its own adapter on
one pass over the shared base, and every client gets what it gets training alone (its losses,
its factors), to the compute dtype's rounding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from fedlora import adapters
from fedlora.config import load_config
from fedlora.data import Example, encode
from fedlora.data.encode import collate
from fedlora.experiment import run_experiment
from fedlora.lora import LoRAFactors
from fedlora.methods import REGISTRY, hook_for
from fedlora.models import build_tiny
from fedlora.rounds import PartyModel
from fedlora.scoring import labelled_logits, mean_token_loss

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
TARGETS = ["q_proj", "v_proj"]
RANKS = [8, 4, 2]
FUSING = sorted(n for n in REGISTRY if hook_for(n).fuses)
ALONE = sorted(n for n in REGISTRY if not hook_for(n).fuses)


def _examples(k: int) -> list[Example]:
    return [Example(f"client {k} asks {i} plus {i}", f"it is {2 * i + k}") for i in range(4 + k)]


def _start(model: Any, rank: int, seed: int) -> dict[str, LoRAFactors]:
    """Factors with a non-zero ``B``, so that both factors get gradients."""
    gen = torch.Generator().manual_seed(seed)
    shapes = adapters.target_shapes(model, TARGETS)
    return {
        n: LoRAFactors(A=torch.randn(rank, d_in, generator=gen) * 0.1,
                       B=torch.randn(d_out, rank, generator=gen) * 0.1)
        for n, (d_out, d_in) in shapes.items()
    }  # fmt: skip


def _gradients(dtype: torch.dtype) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each client's gradients (and loss) from one fused pass, and from its own pass alone."""
    model, tokenizer = build_tiny(seed=0, dtype=dtype)
    batches = [collate(encode(_examples(k), tokenizer, 48), tokenizer.pad_token_id)
               for k in range(len(RANKS))]  # fmt: skip
    starts = [_start(model, r, 10 + k) for k, r in enumerate(RANKS)]

    alone = []
    for k, r in enumerate(RANKS):
        peft_model = adapters.attach(model, TARGETS, r, 2.0 * r, seed=k)
        adapters.write_factors(peft_model, starts[k])
        loss = mean_token_loss(peft_model, batches[k])
        loss.backward()
        alone.append({"loss": float(loss)} | {
            str(i): p.grad.clone() for i, p in enumerate(adapters.trainable(peft_model, "default"))
        })  # fmt: skip
        model = adapters.detach(peft_model)

    names = [f"c{k}" for k in range(len(RANKS))]
    peft_model = model
    for k, r in enumerate(RANKS):
        peft_model = adapters.attach(peft_model, TARGETS, r, 2.0 * r, seed=k, adapter=names[k])
        adapters.write_factors(peft_model, starts[k], names[k])
    adapters.train_adapters(peft_model, names)
    rows_of = [len(b["input_ids"]) for b in batches]
    width = max(b["input_ids"].shape[1] for b in batches)
    every = [e for k in range(len(RANKS)) for e in encode(_examples(k), tokenizer, 48)]
    fused_batch = collate(every, tokenizer.pad_token_id)
    assert fused_batch["input_ids"].shape == (sum(rows_of), width)
    from fedlora.scoring import labelled_logits, token_cross_entropy

    with adapters.RowAdapters(peft_model) as rows:
        rows.assign([n for n, count in zip(names, rows_of, strict=True) for _ in range(count)],
                    width)  # fmt: skip
        logits, targets, mask = labelled_logits(peft_model, fused_batch)
    fused, start, total = [], 0, None
    for count in rows_of:
        part = slice(start, start + count)
        start += count
        loss = token_cross_entropy(logits[part].flatten(0, 1), targets[part].flatten(),
                                   mask[part].flatten())  # fmt: skip
        fused.append({"loss": float(loss)})
        total = loss if total is None else total + loss
    assert total is not None
    total.backward()
    for k, name in enumerate(names):
        fused[k] |= {str(i): p.grad.clone()
                     for i, p in enumerate(adapters.trainable(peft_model, name))}  # fmt: skip
    adapters.detach(peft_model)
    return fused, alone


def test_one_fused_pass_gives_every_client_its_own_gradient_and_loss_in_float32() -> None:
    fused, alone = _gradients(torch.float32)
    for k in range(len(RANKS)):
        assert fused[k].keys() == alone[k].keys() and len(alone[k]) == 1 + 2 * 2 * 2
        assert fused[k]["loss"] == pytest.approx(alone[k]["loss"], rel=1e-6)
        for key in alone[k]:
            if key != "loss":
                torch.testing.assert_close(fused[k][key], alone[k][key], rtol=1e-5, atol=1e-7)


def test_one_fused_pass_matches_in_bfloat16_to_its_rounding() -> None:
    fused, alone = _gradients(torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    for k in range(len(RANKS)):
        assert fused[k]["loss"] == pytest.approx(alone[k]["loss"], rel=4 * eps)
        for key in alone[k]:
            if key != "loss":
                scale = float(alone[k][key].abs().max())
                torch.testing.assert_close(fused[k][key], alone[k][key], rtol=8 * eps,
                                           atol=8 * eps * scale)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_whose_adapter_lacks_a_layer_get_the_base_layer_alone_there(
    dtype: torch.dtype,
) -> None:
    """Client ``c1`` adapts q_proj only, ``c0`` q_proj and v_proj: in one fused pass, each
    client's logits are what its adapter alone gives (``c1``'s rows see v_proj's base layer only,
    and a layer where no row's adapter is present is the base layer alone)."""
    model, tokenizer = build_tiny(seed=0, dtype=dtype)
    batches = [collate(encode(_examples(k), tokenizer, 48), tokenizer.pad_token_id)
               for k in range(2)]  # fmt: skip
    plans = {"c0": (TARGETS, 8), "c1": (["q_proj"], 4)}
    starts = {n: _start(model, r, 20 + i) for i, (n, (_, r)) in enumerate(plans.items())}
    starts["c1"] = {n: f for n, f in starts["c1"].items() if n.endswith("q_proj")}

    alone = []
    for k, (name, (targets, r)) in enumerate(plans.items()):
        peft_model = adapters.attach(model, targets, r, 2.0 * r, seed=k)
        adapters.write_factors(peft_model, starts[name])
        with torch.no_grad():
            alone.append(labelled_logits(peft_model, batches[k])[0])
        model = adapters.detach(peft_model)

    # attach() puts every adapter on its first's modules: c1 on q_proj only through PEFT itself
    peft_model = adapters.attach(model, TARGETS, 8, 16.0, seed=0, adapter="c0")
    peft_model.add_adapter("c1", LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj"]))
    assert (
        "c1" not in adapters.lora_layers(peft_model, "c0")["model.layers.0.self_attn.v_proj"].lora_A
    )
    for name in plans:
        adapters.write_factors(peft_model, starts[name], name)
    adapters.train_adapters(peft_model, list(plans))
    every = [e for k in range(2) for e in encode(_examples(k), tokenizer, 48)]
    fused_batch = collate(every, tokenizer.pad_token_id)
    rows_of = [len(b["input_ids"]) for b in batches]
    width = fused_batch["input_ids"].shape[1]
    with adapters.RowAdapters(peft_model) as rows, torch.no_grad():
        rows.assign(["c0"] * rows_of[0] + ["c1"] * rows_of[1], width)
        logits = labelled_logits(peft_model, fused_batch)[0]
        rows.assign(["c1"] * sum(rows_of), width)  # v_proj: no row's adapter is there
        only_b = labelled_logits(peft_model, fused_batch)[0]
    adapters.detach(peft_model)

    eps = torch.finfo(dtype).eps
    for k, part in enumerate([slice(0, rows_of[0]), slice(rows_of[0], None)]):
        mine = logits[part][:, : alone[k].shape[1]]
        scale = float(alone[k].abs().max())
        torch.testing.assert_close(mine, alone[k], rtol=8 * eps, atol=8 * eps * scale)
    b_rows = only_b[rows_of[0] :][:, : alone[1].shape[1]]
    torch.testing.assert_close(
        b_rows, alone[1], rtol=8 * eps, atol=8 * eps * float(alone[1].abs().max())
    )


def _run(tmp: Path, overrides: list[str], fuse: bool) -> Path:
    out = tmp / ("fused" if fuse else "alone")
    run_experiment(load_config(TINY, [*overrides, f"train.fuse={str(fuse).lower()}"]), out,
                   progress=False)  # fmt: skip
    return out


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


THRESHOLDED = {"fedsrd"}
"""Methods whose upload keeps the entries above a data-dependent threshold (FedSRD's
importance sparsification): float32's rounding may put an entry at the threshold on either
side, so two runs that train alike to rounding may send different sparse updates."""

SETTINGS = [  # mixed ranks, accumulation, clipping, partial participation; epochs: unequal steps
    "clients.num_clients=4",
    "clients.fraction=0.75",
    "train.grad_accum=2",
    "train.max_grad_norm=0.5",
    "train.epochs=1.5",
    "rounds=2",
    "data.limit=80",  # 64 training examples: a few steps each, unequal across clients
]


@pytest.mark.parametrize("strategy", FUSING)
def test_fused_and_one_at_a_time_give_every_strategy_the_same_run(
    strategy: str, tmp_path: Path
) -> None:
    ranks = "[8,4,2,4]" if REGISTRY[strategy].traits.mixed_ranks else "[4]"
    overrides = [f"strategy={strategy}", f"clients.ranks={ranks}", *SETTINGS]
    fused, alone = _run(tmp_path, overrides, True), _run(tmp_path, overrides, False)
    rows = list(zip(_rows(alone), _rows(fused), strict=True))
    if strategy in THRESHOLDED:  # round 1's training is the same; then float32 noise can flip
        a, b = rows[1]  # an entry at the threshold, which moves the result by that entry
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        assert rows[-1][1]["eval_loss"] == pytest.approx(rows[-1][0]["eval_loss"], rel=1e-2)
        return
    for a, b in rows:
        assert a["clients"] == b["clients"]
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
        if a["train_loss"] is not None:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    want, got = _deltas(alone), _deltas(fused)
    assert want.keys() == got.keys()
    for key in want:  # Adam divides by √v: a gradient near 0 carries float32's noise to lr scale
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def _deltas(out: Path) -> dict[str, torch.Tensor]:
    """Each module's exported ``ΔW = B A`` (an export in SVD form is unique only up to a
    rotation of equal singular values, so the factors themselves may differ)."""
    tensors = _adapter(out)
    return {
        key.removesuffix(".lora_A.weight"): tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        for key in tensors
        if key.endswith(".lora_A.weight")
    }


def _group_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many clients each call of :meth:`PartyModel.train_together` trains, as they come."""
    sizes: list[int] = []
    real = PartyModel.train_together

    def spy(self: PartyModel, jobs: Any, t: int) -> Any:
        sizes.append(len(jobs))
        return real(self, jobs, t)

    monkeypatch.setattr(PartyModel, "train_together", spy)
    return sizes


@pytest.mark.parametrize("strategy", ALONE)
def test_a_method_whose_clients_do_more_trains_them_one_at_a_time_however_fuse_is_set(
    strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _group_sizes(monkeypatch)
    ranks = "[8,4,2]" if REGISTRY[strategy].traits.mixed_ranks else "[4]"
    overrides = [f"strategy={strategy}", f"clients.ranks={ranks}", "rounds=1"]
    fused, alone = _run(tmp_path, overrides, True), _run(tmp_path, overrides, False)
    assert groups == [1] * 6  # 3 clients a round, in both runs, each alone
    for key, value in _adapter(alone).items():
        assert torch.equal(_adapter(fused)[key], value), key


def test_a_pass_carries_at_most_fuse_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _group_sizes(monkeypatch)
    # tiny: batch 4 × 64 tokens = 256 a client; 600 tokens hold 2 of the 5 clients a pass
    overrides = ["clients.num_clients=5", "clients.ranks=[4]", "rounds=1", "train.fuse_tokens=600"]
    _run(tmp_path, overrides, True)
    assert groups == [2, 2, 1]


def test_privacy_noises_each_fused_client_as_it_would_alone(tmp_path: Path) -> None:
    private = ["privacy.clip_norm=0.05", "privacy.noise_multiplier=0.5", "privacy.noise_seed=3"]
    fused, alone = _run(tmp_path, private, True), _run(tmp_path, private, False)
    for key, value in _deltas(alone).items():
        torch.testing.assert_close(_deltas(fused)[key], value, rtol=1e-4, atol=1e-5)


def test_bench_fused_prints_and_writes_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlora.cli import main

    out = tmp_path / "fused.json"
    argv = ["bench", "fused", "--model", "tiny-llama", "--steps", "2", "--repeats", "1"]
    assert main([*argv, "--clients", "3", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    (group,) = figures["groups"]
    assert group["clients"] == 3 and group["ranks"] == [16, 8, 4]
    assert figures["speedup_3"] == pytest.approx(group["sequential_s"] / group["fused_s"])
    assert figures["of_bound_3"] == pytest.approx(figures["speedup_3"] / figures["bound_3"])
    assert figures["bound_3"] > 0 and figures["peak_gflops"] > 0 and group["fused_gflops"] > 0
    assert "| 3 | [16, 8, 4] |" in capsys.readouterr().out
    assert main([*argv, "--clients", "1"]) == 2
    assert "--clients: group sizes of at least 2, got '1'" in capsys.readouterr().err


def test_a_hook_that_fuses_but_needs_callbacks_is_refused_not_silently_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.clients import Callbacks, ClientHook

    monkeypatch.setattr(ClientHook, "prepare", lambda self, model: Callbacks(on_step=lambda: None))
    with pytest.raises(ValueError, match="says it fuses but returns callbacks"):
        _run(tmp_path, ["rounds=1"], True)


def _saved_bytes_per_token(model: Any, tokens: torch.Tensor) -> float:
    """The bytes autograd keeps for the backward pass of one training forward, per token: every
    saved tensor's storage once, parameters (resident anyway) left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=tokens, labels=tokens)
    return sum(kept.values()) / tokens.numel()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_activation_estimate_is_within_twice_what_autograd_keeps(
    kind: str, dtype: torch.dtype, checkpointing: bool
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedlora.train import activation_bytes_per_token

    if kind == "llama":
        model, _ = build_tiny(seed=0, dtype=dtype)
        targets = TARGETS
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=300)
        model, targets = GPT2LMHeadModel(config).to(dtype), ["c_attn"]
    peft_model = adapters.attach(model, targets, 4, 8.0, seed=0)
    if checkpointing:
        adapters.checkpoint_activations(peft_model)
    peft_model.train()
    tokens = torch.randint(0, 200, (4, 64), generator=torch.Generator().manual_seed(0))
    saved = _saved_bytes_per_token(peft_model, tokens)
    estimate = activation_bytes_per_token(model.config, dtype.itemsize, 64, checkpointing)
    if checkpointing:  # autograd keeps each layer's input; the estimate adds the recomputed layer
        assert saved <= estimate <= 8 * saved, (saved, estimate)
    else:
        assert saved / 2 <= estimate <= 2 * saved, (saved, estimate)


def test_a_pass_carries_no_more_tokens_than_half_the_memory_left_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedlora import devices, train
    from fedlora.config import TrainConfig

    assert devices.total_memory_bytes(devices.HOST) > 2**30  # the real host's, before patching
    model, _ = build_tiny(seed=0)
    held = [*model.parameters(), *model.buffers()]
    resident = sum(t.numel() * t.element_size() for t in held)
    per_token = train.activation_bytes_per_token(model.config, 4, 64, False)
    monkeypatch.setattr(devices, "total_memory_bytes", lambda _: resident + 2000 * per_token)
    assert train.tokens_per_pass(model, TrainConfig(fuse_tokens=4096), 64, False) == 1000
    assert train.tokens_per_pass(model, TrainConfig(fuse_tokens=600), 64, False) == 600
    monkeypatch.setattr(devices, "total_memory_bytes", lambda _: resident)
    assert train.tokens_per_pass(model, TrainConfig(), 64, False) == 0


def test_packing_keeps_each_clients_examples_in_rows_of_its_own() -> None:
    from fedlora.data.encode import Encoded, pack

    def ex(n: int, first_label: int) -> Encoded:
        return Encoded(list(range(10, 10 + n)), [first_label] + [-100] * (n - 2) + [99])

    groups = [[ex(3, 5), ex(3, 5), ex(6, 5)], [ex(2, 7)], [ex(5, 8), ex(5, 8)]]
    batch, rows = pack(groups, pad_id=0)

    assert rows == [2, 1, 2] and batch["input_ids"].shape == (5, 6)  # rows of the longest, 6
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 10, 11, 12]  # 3 + 3; 6 does not fit
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["input_ids"][2].tolist() == [10, 11, 0, 0, 0, 0]  # padding: its own sequence
    assert batch["position_ids"][2].tolist() == [0, 1, 0, 1, 2, 3]
    # a sequence's first label is never a target, of it or of the sequence before it
    assert batch["labels"][0].tolist() == [-100, -100, 99, -100, -100, 99]
    assert int((batch["labels"] != -100).sum()) == 6  # each example's last token only


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_transformers_model_keeps_packed_sequences_apart_and_gives_their_logits(
    kind: str,
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedlora.data.encode import pack
    from fedlora.scoring import labelled_logits, packs_sequences

    model, tokenizer = build_tiny(seed=0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           vocab_size=len(tokenizer)))  # fmt: skip
    model.eval()
    groups = [encode(_examples(k), tokenizer, 48) for k in range(3)]
    batch, _ = pack(groups, tokenizer.pad_token_id)

    assert packs_sequences(model)
    logits, targets, mask = labelled_logits(model, batch)

    want_logits, want_targets = [], []
    for group in groups:
        got, t, m = labelled_logits(model, collate(group, tokenizer.pad_token_id))
        want_logits.append(got[m])
        want_targets.append(t[m])
    assert bool(mask.all()) and torch.equal(targets[0], torch.cat(want_targets))
    torch.testing.assert_close(logits[0], torch.cat(want_logits), rtol=1e-5, atol=1e-5)


def test_a_model_that_lets_packed_sequences_see_each_other_is_not_packed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import masking_utils

    from fedlora.scoring import packs_sequences

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda positions: None)
    model, _ = build_tiny(seed=0)
    model.train()
    assert not packs_sequences(model)
    assert model.training  # the probe ran in eval mode and restored the model's
    assert model._fedlora_packs is False  # asked once, kept on the model


def test_fused_training_without_packing_gives_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora import train

    monkeypatch.setattr(train, "packs_sequences", lambda model: False)  # the padded batch
    overrides = ["strategy=flexlora", "clients.ranks=[8,4,2,4]", *SETTINGS]
    fused, alone = _run(tmp_path, overrides, True), _run(tmp_path, overrides, False)
    for a, b in zip(_rows(alone), _rows(fused), strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)

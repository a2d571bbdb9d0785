"""Mixed precision: the compute dtype ``auto`` picks, and FLoRA's merged update kept exactly in
float32 whatever the compute dtype (on the tiny model, in bfloat16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import random_factors, rel_err
from fedlora import adapters, precision
from fedlora.config import RunConfig, load_config
from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.federation import build_federation
from fedlora.lora import BaseDelta, LoRAFactors
from fedlora.models import build_tiny, load_model
from fedlora.precision import MergedBase, resolve_dtype
from fedlora.rounds import RunOutcome
from fedlora.simulation import Runner

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def tiny(*overrides: str) -> RunConfig:
    return load_config(TINY, ["model.dtype=bfloat16", *overrides])


# --- the dtype auto picks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "native_bf16", "capability", "expected"),
    [
        (CPU, True, (7, 0), torch.bfloat16),
        (CPU, False, (9, 0), torch.float32),
        (CUDA, False, (8, 0), torch.bfloat16),  # A100
        (CUDA, False, (9, 0), torch.bfloat16),  # H100
        (CUDA, True, (7, 5), torch.float32),  # T4: bfloat16 only emulated
        (CUDA, True, (7, 0), torch.float32),  # V100
    ],
)
@pytest.mark.usefixtures("hardware_auto")
def test_auto_picks_bfloat16_only_where_the_hardware_has_it(
    monkeypatch: pytest.MonkeyPatch,
    device: torch.device,
    native_bf16: bool,
    capability: tuple[int, int],
    expected: torch.dtype,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    # torch counts emulation as support (V100, T4): auto must not follow it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    assert resolve_dtype("auto", device) == expected


def test_explicit_dtypes_are_kept_and_float16_on_a_cpu_without_it_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: False)

    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("float16", CUDA) == torch.float16
    with pytest.raises(ConfigError, match="float16 on this CPU: it has no native float16"):
        resolve_dtype("float16", CPU)
    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: True)
    assert resolve_dtype("float16", CPU) == torch.float16
    with pytest.raises(ConfigError, match=r"unknown model\.dtype 'half'"):
        resolve_dtype("half", CPU)


def test_a_bad_dtype_stops_the_config_check_before_anything_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: False)
    with pytest.raises(ConfigError, match=r"unknown model\.dtype 'bf16'"):
        build_federation(tiny("model.dtype=bf16"))
    with pytest.raises(ConfigError, match="float16 on this CPU"):
        build_federation(tiny("model.dtype=float16"))


@pytest.mark.usefixtures("hardware_auto")
def test_the_detection_reads_this_machine() -> None:
    # whatever the CPU, the answer is a bool and auto follows it
    native = precision.cpu_has_native_bf16()
    assert isinstance(native, bool)
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)


# --- the merged base --------------------------------------------------------------------------


def _bf16_tiny() -> torch.nn.Module:
    model: torch.nn.Module = build_tiny(seed=0)[0].to(torch.bfloat16)
    return model


def test_a_float32_weight_is_its_own_master_and_holds_no_term() -> None:
    model, _ = build_tiny(seed=0)
    w = model.get_submodule(Q).weight
    before = w.detach().clone()
    delta = random_factors(64, 64, 3, torch.Generator().manual_seed(1))
    base = MergedBase(model)

    base.merge({Q: delta})

    assert base.master(Q) is w and not base.terms
    assert torch.allclose(w, before + delta.delta(), atol=1e-6)


def _small_updates(gen: torch.Generator) -> dict[str, BaseDelta]:
    # about 1e-3 of the weights (|W| ~ 0.02), as a round of lr 3e-4 makes: about a bfloat16 step
    fq = random_factors(64, 64, 2, gen)
    return {Q: LoRAFactors(A=fq.A * 3e-3, B=fq.B * 3e-3), V: 2e-5 * torch.randn(32, 64)}


def test_merging_in_bfloat16_keeps_every_update_exactly_in_the_forward_pass() -> None:
    model = _bf16_tiny()
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in (Q, V)}
    gen = torch.Generator().manual_seed(2)
    base = MergedBase(model)
    totals = {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in w0.items()}

    for _ in range(5):
        deltas = _small_updates(gen)
        base.merge(deltas)
        for name, d in deltas.items():
            totals[name] += (d.delta() if isinstance(d, LoRAFactors) else d).double()

    x = torch.randn(3, 64, generator=gen).bfloat16()
    for name, w in w0.items():
        module = model.get_submodule(name)
        assert torch.equal(module.weight, w)  # the bfloat16 weight is never rounded into
        held = base.delta(name)
        assert held is not None and rel_err(held, totals[name]) < 1e-6
        with torch.no_grad():
            y = module(x).float()
        want = x.double() @ (w.double() + totals[name]).T
        plain = (x.double() @ w.double().T).bfloat16().double()
        # the output is W₀ x + ΔW x rounded once to bfloat16; without the term it would be W₀ x
        assert float((y - want).abs().max()) <= float((plain - want).abs().max())
        assert rel_err(y, want) <= 2**-8  # bfloat16's own rounding of the output
    assert isinstance(base.terms[Q], LoRAFactors) and base.terms[Q].rank == 10  # stacked
    assert not isinstance(base.terms[V], LoRAFactors)  # dense in, dense kept
    # what merging into the bfloat16 weight would have kept: most of the update is lost
    naive = w0[V]
    for d in [2e-5 * torch.randn(32, 64, generator=torch.Generator().manual_seed(3))] * 5:
        naive = (naive.float() + d).bfloat16()
    assert rel_err(naive.double() - w0[V].double(), 5 * d.double()) > 0.1


def test_a_stacked_term_goes_dense_once_that_is_smaller() -> None:
    model = _bf16_tiny()
    base = MergedBase(model)
    gen = torch.Generator().manual_seed(6)
    parts = [random_factors(64, 64, 8, gen) for _ in range(5)]  # 64 x 64: dense from rank 32

    for k, f in enumerate(parts):
        base.merge({Q: f})
        assert isinstance(base.terms[Q], LoRAFactors) == (8 * (k + 1) < 32)

    total = sum((f.delta().double() for f in parts), start=torch.zeros(64, 64).double())
    held = base.delta(Q)
    assert held is not None and rel_err(held, total) < 1e-6


def test_a_reset_party_that_merges_the_same_deltas_holds_the_same_state_bitwise() -> None:
    server, node = _bf16_tiny(), _bf16_tiny()
    gen = torch.Generator().manual_seed(4)
    deltas = [{Q: random_factors(64, 64, 2, gen), V: random_factors(32, 64, 3, gen)}]
    deltas.append({Q: random_factors(64, 64, 4, gen), V: random_factors(32, 64, 1, gen)})
    on_server, on_node = MergedBase(server), MergedBase(node)
    for d in deltas:
        on_server.merge(d)

    for received in (deltas[:1], deltas):  # a node restores every round from the pristine base
        on_node.reset([Q, V])
        for d in received:
            on_node.merge(d)

    ids = torch.randint(0, 200, (2, 10), generator=gen)
    with torch.no_grad():
        assert torch.equal(node(input_ids=ids).logits, server(input_ids=ids).logits)
    for name in (Q, V):
        assert torch.equal(on_node.master(name), on_server.master(name))
    on_node.reset([Q, V])
    with torch.no_grad():
        assert torch.equal(node(input_ids=ids).logits, _bf16_tiny()(input_ids=ids).logits)


def test_the_float32_state_dict_is_the_exact_merged_model_with_tied_weights_shared() -> None:
    model = _bf16_tiny()
    base = MergedBase(model)
    delta = random_factors(64, 64, 2, torch.Generator().manual_seed(5))
    base.merge({Q: delta})

    state = base.float32_state_dict()

    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert torch.equal(state[f"{Q}.weight"], base.master(Q))
    assert (
        rel_err(state[f"{Q}.weight"] - model.get_submodule(Q).weight.float(), delta.delta()) < 1e-5
    )
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_lora_parameters_and_their_factors_stay_float32_on_a_bfloat16_base() -> None:
    model = _bf16_tiny()
    peft_model = adapters.attach(model, ["q_proj", "v_proj"], 4, 8.0, seed=0)

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]

    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(f.A.dtype == torch.float32 for f in adapters.read_factors(peft_model).values())
    adapters.detach(peft_model)


# --- FLoRA end to end in bfloat16 -------------------------------------------------------------


def _flora_bf16(
    tmp_path: Path, rounds: int = 3
) -> tuple[Runner, RunOutcome, dict[str, torch.Tensor]]:
    fed = build_federation(tiny(f"rounds={rounds}"))
    assert fed.loaded.model.dtype == torch.bfloat16
    w0 = {n: fed.loaded.model.get_submodule(n).weight.detach().clone() for n in fed.shapes}
    runner = Runner(fed, tmp_path, progress=False)
    outcome = runner.run(lambda record, snapshot: None)
    return runner, outcome, w0


def test_after_several_flora_rounds_in_bfloat16_the_base_is_w0_plus_every_update(
    tmp_path: Path,
) -> None:
    runner, outcome, w0 = _flora_bf16(tmp_path)

    assert outcome.export is not None
    for name, factors in outcome.export.items():
        total = factors.delta().double()  # Σ_t ΔW_t, the exported adapter (float32 factors)
        held = runner.party.base.delta(name)  # what the forward pass adds to W₀
        assert held is not None and held.dtype == torch.float32
        assert rel_err(held, total) <= 1e-4
        assert torch.equal(runner.model.get_submodule(name).weight, w0[name])


def test_the_evaluated_model_is_the_exported_adapter_on_the_base_to_bfloat16_rounding(
    tmp_path: Path,
) -> None:
    runner, outcome, w0 = _flora_bf16(tmp_path)
    assert outcome.export is not None
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    same_attention = _bf16_tiny()  # and the attention implementation the run resolved
    same_attention.set_attn_implementation(runner.model.config._attn_implementation)
    with_adapter = adapters.attach_factors(same_attention, ["q_proj", "v_proj"], outcome.export)
    exact = build_tiny(seed=0)[0]  # float32, W₀ and the update merged in float32
    for name, factors in outcome.export.items():
        exact.get_submodule(name).weight.data = w0[name].float() + factors.delta()
    plain_f32 = build_tiny(seed=0)[0]
    for name in w0:
        plain_f32.get_submodule(name).weight.data = w0[name].float()

    with torch.no_grad():
        evaluated = runner.model(input_ids=ids).logits.float()
        exported = with_adapter(input_ids=ids).logits.float()
        reference = exact(input_ids=ids).logits
        base_f32 = plain_f32(input_ids=ids).logits
        base_bf16 = _bf16_tiny()(input_ids=ids).logits.float()

    rounding = float((base_bf16 - base_f32).abs().max())  # bfloat16's own error on this model
    update = float((reference - base_f32).abs().max())  # what the merged update changes
    assert update > 10 * rounding
    assert float((evaluated - reference).abs().max()) <= 1.5 * rounding
    assert float((exported - reference).abs().max()) <= 1.5 * rounding
    # The merged term computes what PEFT computes for the adapter: the same sum, rounded to
    # bfloat16 where each layer hands on its output, in an order each CPU's kernels choose
    # (bitwise equal on AVX512-BF16, one bfloat16 step apart on AMX). Bound: two bfloat16 steps
    # at the logits' magnitude, bfloat16's own rounding, not one machine's.
    step = torch.finfo(torch.bfloat16).eps * float(reference.abs().max())
    assert float((evaluated - exported).abs().max()) <= 2 * step


def test_a_bfloat16_run_records_its_dtype(tmp_path: Path) -> None:
    summary = run_experiment(tiny("rounds=1"), tmp_path / "run", progress=False)

    assert summary["dtype"] == "bfloat16"
    assert "computed in **bfloat16**" in (tmp_path / "run" / "summary.md").read_text()


def test_a_merged_model_saved_from_a_bfloat16_run_holds_the_exact_update(tmp_path: Path) -> None:
    run_experiment(tiny("save_merged=true"), tmp_path / "run", progress=False)

    merged = load_model(str(tmp_path / "run" / "merged"), device="cpu", dtype="float32").model
    factors = adapters.read_adapter(tmp_path / "run" / "adapter")
    base = _bf16_tiny()
    for name, f in factors.items():
        change = (
            merged.get_submodule(name).weight.double() - base.get_submodule(name).weight.double()
        )
        assert rel_err(change, f.delta()) <= 1e-4


@pytest.mark.parametrize("forced", ["float32", "bfloat16"])
def test_the_environment_can_make_auto_take_another_machine_s_dtype(
    monkeypatch: pytest.MonkeyPatch, forced: str
) -> None:
    monkeypatch.setenv(precision.AUTO_DTYPE_VARIABLE, forced)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: forced == "float32")

    assert resolve_dtype("auto", CPU) == precision.DTYPES[forced]  # not the hardware's
    assert resolve_dtype("float32", CPU) == torch.float32  # an explicit dtype is kept
    monkeypatch.setenv(precision.AUTO_DTYPE_VARIABLE, "half")
    with pytest.raises(ConfigError, match="FEDLORA_AUTO_DTYPE='half'"):
        resolve_dtype("auto", CPU)

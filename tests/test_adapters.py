"""The PEFT boundary: scaling folded once, start factors, merged deltas, export round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import random_factors, rel_err
from fedlora import adapters
from fedlora.errors import ConfigError
from fedlora.lora import LoRAFactors
from fedlora.models import build_tiny
from fedlora.precision import MergedBase

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def model() -> torch.nn.Module:
    return build_tiny(seed=0)[0]


def test_target_shapes_names_every_projection(model: torch.nn.Module) -> None:
    shapes = adapters.target_shapes(model, TARGETS)

    assert shapes == {
        "model.layers.0.self_attn.q_proj": (64, 64),
        "model.layers.0.self_attn.v_proj": (32, 64),
        "model.layers.1.self_attn.q_proj": (64, 64),
        "model.layers.1.self_attn.v_proj": (32, 64),
    }
    with pytest.raises(ConfigError, match="no linear layer named"):
        adapters.target_shapes(model, ["query"])


def test_read_factors_folds_the_scaling(model: torch.nn.Module) -> None:
    peft_model = adapters.attach(model, TARGETS, rank=4, alpha=12.0, seed=1)
    layer = adapters.lora_layers(peft_model)["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()

    factors = adapters.read_factors(peft_model)["model.layers.1.self_attn.v_proj"]

    A0, B0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.allclose(factors.delta(), 3.0 * B0 @ A0)  # s = α / r = 12 / 4
    assert torch.equal(factors.A, A0)


def test_attach_is_seeded_and_leaves_the_global_rng_alone(model: torch.nn.Module) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    peft_model = adapters.attach(model, TARGETS, 2, 4.0, seed=7)
    first = adapters.read_factors(peft_model)
    with pytest.raises(ConfigError, match="already has LoRA layers"):
        adapters.attach(peft_model.base_model.model, TARGETS, 2, 4.0, seed=7)
    model = adapters.detach(peft_model)
    second = adapters.read_factors(adapters.attach(model, TARGETS, 2, 4.0, seed=7))
    third = adapters.read_factors(adapters.attach(build_tiny(0)[0], TARGETS, 2, 4.0, seed=8))

    assert torch.equal(torch.rand(1), expected_next)
    for name in first:
        assert torch.equal(first[name].A, second[name].A)
        assert not torch.equal(first[name].A, third[name].A)


def test_start_factors_fill_the_first_components_and_the_rest_stay_fresh(
    model: torch.nn.Module,
) -> None:
    peft_model = adapters.attach(model, TARGETS, rank=6, alpha=12.0, seed=3)
    fresh = adapters.read_factors(peft_model)
    name = "model.layers.0.self_attn.q_proj"
    start = random_factors(64, 64, 2, torch.Generator().manual_seed(0))

    adapters.write_factors(peft_model, {name: start})
    got = adapters.read_factors(peft_model)[name]

    assert torch.allclose(got.A[:2], start.A) and torch.allclose(got.B[:, :2], start.B, atol=1e-6)
    assert torch.equal(got.A[2:], fresh[name].A[2:])  # fresh random A
    assert torch.count_nonzero(got.B[:, 2:]) == 0  # fresh zero B
    too_big = random_factors(64, 64, 7, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="do not fit"):
        adapters.write_factors(peft_model, {name: too_big})


def test_detach_gives_back_the_unchanged_base(model: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = adapters.attach(model, TARGETS, rank=2, alpha=4.0, seed=0)
    for layer in adapters.lora_layers(peft_model).values():
        with torch.no_grad():
            layer.lora_B["default"].weight.fill_(1.0)

    base = adapters.detach(peft_model)

    assert not adapters.lora_layers_present(base)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])


def test_rank_above_the_module_is_a_clear_error(model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="rank 40 is larger than module"):
        adapters.attach(model, TARGETS, rank=40, alpha=80.0, seed=0)


def test_exported_adapter_loads_in_peft_and_reproduces_the_global_update(
    tmp_path: Path,
) -> None:
    model, _ = build_tiny(seed=0)
    shapes = adapters.target_shapes(model, TARGETS)
    gen = torch.Generator().manual_seed(5)
    ranks = dict(zip(shapes, [5, 3, 8, 1], strict=True))  # a different rank per module
    factors = {n: random_factors(*shapes[n], ranks[n], gen) for n in shapes}
    factors = {n: LoRAFactors(A=f.A * 0.1, B=f.B * 0.1) for n, f in factors.items()}

    adapters.export_adapter(model, factors, TARGETS, tmp_path / "adapter")
    assert not adapters.lora_layers_present(model)
    loaded = adapters.load_adapter(build_tiny(seed=0)[0], tmp_path / "adapter")

    for name, layer in adapters.lora_layers(loaded).items():
        assert rel_err(layer.get_delta_weight("default"), factors[name].delta()) < 1e-6
    ids = torch.randint(0, 200, (2, 12), generator=gen)
    merged, _ = build_tiny(seed=0)
    MergedBase(merged).merge(factors)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_read_adapter_gives_back_the_exported_factors(tmp_path: Path) -> None:
    model, _ = build_tiny(seed=0)
    shapes = adapters.target_shapes(model, TARGETS)
    gen = torch.Generator().manual_seed(6)
    factors = {n: random_factors(*shapes[n], 1 + i, gen) for i, n in enumerate(shapes)}
    adapters.export_adapter(model, factors, TARGETS, tmp_path / "adapter")

    read = adapters.read_adapter(tmp_path / "adapter")

    assert sorted(read) == sorted(factors)
    for name, f in factors.items():
        assert rel_err(read[name].delta(), f.delta()) < 1e-6


@pytest.mark.parametrize("rslora", [False, True])
def test_read_adapter_applies_peft_rank_and_alpha_patterns(tmp_path: Path, rslora: bool) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
        use_rslora=rslora,
    )
    peft_model = get_peft_model(build_tiny(seed=0)[0], config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in adapters.lora_layers(peft_model).values():
            B = layer.lora_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=gen))  # PEFT starts B at zero
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    read = adapters.read_adapter(tmp_path / "adapter")

    layers = adapters.lora_layers(peft_model)
    assert sorted(read) == sorted(layers)
    assert {read[n].rank for n in read if n.endswith("q_proj")} == {2}
    with torch.no_grad():
        for name, layer in layers.items():
            assert rel_err(read[name].delta(), layer.get_delta_weight("default")) < 1e-6


def test_read_adapter_names_the_folder_or_the_key_it_cannot_use(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    with pytest.raises(ConfigError, match="not a readable PEFT LoRA adapter"):
        adapters.read_adapter(tmp_path / "nothing")
    model, _ = build_tiny(seed=0)
    shapes = adapters.target_shapes(model, TARGETS)
    gen = torch.Generator().manual_seed(8)
    factors = {n: random_factors(*shapes[n], 2, gen) for n in shapes}
    folder = adapters.export_adapter(model, factors, TARGETS, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))

    with pytest.raises(ConfigError, match=f"no matching {dropped}"):
        adapters.read_adapter(folder)

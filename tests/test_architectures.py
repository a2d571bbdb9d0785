"""Every architecture PEFT's LoRA adapts: tiny random GPT-2, Qwen2, Phi-3, Gemma and Mistral
models, built from their configs and saved as local folders, each run federated (FLoRA: the
update merged into the base every round, so GPT-2's ``Conv1D`` layers are merged too) with the
LoRA targets PEFT's table gives their model type, and each exported adapter loaded by PEFT onto
the base reproduces the loss the run evaluated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlora import adapters
from fedlora.config import load_config
from fedlora.evaluate import evaluate
from fedlora.experiment import run_experiment
from fedlora.federation import federation_data
from fedlora.models import tiny_tokenizer

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}


def _config(kind: str, tokenizer: Any) -> Any:
    import transformers as tf

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
    }
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids)
    if kind == "qwen2":
        return tf.Qwen2Config(**SIZES, **HEADS, **ids)
    if kind == "phi3":
        return tf.Phi3Config(**SIZES, num_attention_heads=4, num_key_value_heads=4, **ids)
    if kind == "gemma":
        return tf.GemmaConfig(**SIZES, **HEADS, head_dim=16, **ids)
    if kind == "mistral":
        return tf.MistralConfig(**SIZES, **HEADS, **ids)
    raise ValueError(kind)


def _saved_model(kind: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(kind, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TARGETS = {
    "gpt2": ["c_attn"],  # GPT-2's fused attention input, a Conv1D
    "qwen2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],  # not in PEFT's table: fedlora's supplement
    "gemma": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_each_architecture_trains_merges_and_exports_an_adapter_peft_reproduces(
    kind: str, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = _saved_model(kind, tmp_path / kind)
    cfg = load_config(TINY, [f"model.name={folder}", "train.steps=2"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    assert summary["targets"] == TARGETS[kind]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(TARGETS[kind])
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    shapes = adapters.target_shapes(base, [])
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    data = federation_data(cfg)
    metrics = evaluate(
        peft_model,
        tiny_tokenizer(),
        data.heldout,
        data.kind,  # type: ignore[arg-type]
        batch_size=cfg.eval.batch_size,
        max_length=cfg.model.max_length,
    )
    assert summary["final"] != pytest.approx(summary["base"], abs=1e-4)  # it learned something
    assert metrics["loss"] == pytest.approx(summary["final"], rel=1e-5)
    factors = adapters.read_adapter(tmp_path / "run" / "adapter")
    assert {n: (f.d_out, f.d_in) for n, f in factors.items()} == shapes


def test_gpt2_s_conv1d_merges_in_its_stored_layout(tmp_path: Path) -> None:
    """``Conv1D`` keeps its weight ``(d_in, d_out)``: a merged ``ΔW: (d_out, d_in)`` goes in
    transposed, and the layer then computes ``x (W + ΔWᵀ)``, what the adapter computes."""
    from transformers import AutoModelForCausalLM

    from fedlora.lora import LoRAFactors
    from fedlora.precision import MergedBase

    model = AutoModelForCausalLM.from_pretrained(_saved_model("gpt2", tmp_path / "g"))
    name = "transformer.h.0.attn.c_attn"
    layer = model.get_submodule(name)
    gen = torch.Generator().manual_seed(0)
    delta = LoRAFactors(A=torch.randn(3, 64, generator=gen), B=torch.randn(192, 3, generator=gen))
    x = torch.randn(5, 64, generator=gen)
    expected = layer(x) + x @ delta.delta().T

    MergedBase(model).merge({name: delta})

    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_a_model_type_without_default_targets_names_its_layers() -> None:
    from fedlora.errors import ConfigError
    from fedlora.models import build_tiny

    model, _ = build_tiny(0)
    model.config.model_type = "unknown-arch"
    with pytest.raises(ConfigError, match=r"model type 'unknown-arch'.*q_proj"):
        adapters.resolve_targets(model, [])
    assert adapters.resolve_targets(model, ["o_proj"]) == ["o_proj"]  # the key still wins

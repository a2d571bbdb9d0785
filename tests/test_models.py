"""Model loading: tiny, local folder (the same code path as a hub id), errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.models import build_tiny, load_model, resolve_device


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)

    a, tok = build_tiny(seed=0)
    b, _ = build_tiny(seed=0)
    c, _ = build_tiny(seed=1)

    assert torch.equal(torch.rand(1), expected)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"


def test_local_folder_loads_like_a_hub_model(tmp_path: Path) -> None:
    model, tokenizer = build_tiny(seed=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")

    loaded = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")

    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.tokenizer.chat_template == tokenizer.chat_template


def test_folder_without_config_and_missing_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here

    with pytest.raises(ConfigError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")

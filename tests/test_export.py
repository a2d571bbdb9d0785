"""What a finished run hands its user: an adapter that names a base the hub knows, its model
card, and the merged full model on demand (``fedlora export RUN_DIR --merged DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import export_merged, run_experiment
from fedlora.models import DEFAULT_HUB_ID, DEFAULT_MODEL, TINY_MODEL, published_name

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


def test_the_embedded_default_is_published_as_its_hub_id_and_a_folder_as_its_path(
    tmp_path: Path,
) -> None:
    assert published_name(DEFAULT_MODEL) == DEFAULT_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert published_name("HuggingFaceTB/SmolLM2-360M-Instruct") == (
        "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    assert published_name(TINY_MODEL) == TINY_MODEL
    folder = tmp_path / "model"
    folder.mkdir()
    assert published_name(str(folder)) == str(folder.resolve())


@pytest.fixture(scope="module")
def flora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(TINY, ["rounds=2", "save_merged=true", "eval.rouge_samples=2"])
    run_experiment(cfg, out, progress=False)
    return out


def test_the_adapter_names_its_base_and_carries_a_model_card_of_the_run(flora_run: Path) -> None:
    config = json.loads((flora_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL
    summary = json.loads((flora_run / "summary.json").read_text())
    card = (flora_run / "adapter" / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {TINY_MODEL}\nlibrary_name: peft\n")
    assert "- flora\n---" in card
    assert "| strategy | `flora` |" in card
    assert "| clients | 3 registered, ranks 8, 4, 2; 100% per round |" in card
    assert "| rounds | 2 × 3 local steps (batch 4, lr 0.003) |" in card
    assert "examples scored (test split)" in card
    assert f"| fedlora | {__import__('fedlora').__version__} |" in card
    for metric in ("loss", "rougeL"):
        points = summary["per_round"][metric]
        assert f"| {metric} | {points['0']:.4f} | {points['2']:.4f} |" in card
    assert f'from_pretrained("{TINY_MODEL}")' in card
    assert "Q4_1" not in card  # the note on the embedded default's weights is for it alone


def test_export_writes_the_run_s_merged_model_from_its_adapter(
    flora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert main(["export", str(flora_run), "--merged", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    exported = load_file(out / "model.safetensors")
    saved = load_file(flora_run / "merged" / "model.safetensors")  # the run's own, save_merged
    assert exported.keys() == saved.keys()
    changed = 0
    for key, tensor in saved.items():
        assert exported[key].dtype == torch.float32
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=2e-6)
        changed += "proj" in key
    assert changed > 0 and (out / "tokenizer_config.json").is_file()


def test_export_refuses_a_run_without_an_adapter_before_loading_anything(tmp_path: Path) -> None:
    run = tmp_path / "standalone"
    run.mkdir()
    cfg = load_config(TINY, ["strategy=standalone"])
    (run / "config.json").write_text(json.dumps(__import__("fedlora.config").config.to_dict(cfg)))
    with pytest.raises(ConfigError, match=r"standalone has no global adapter .*adapter_config"):
        export_merged(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert main(["export", str(tmp_path / "nowhere"), "--merged", str(tmp_path / "m")]) == 2

"""``fedlora eval`` and ``fedlora generate`` on a finished run folder (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora import adapters
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.data.encode import encode_prompt
from fedlora.data.examples import Example
from fedlora.errors import ConfigError
from fedlora.evaluate import generate_greedy
from fedlora.experiment import run_experiment
from fedlora.trained import evaluate_trained, generate_answers, load_trained

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    # float32: the run's own final scores come from its merged base weights, fedlora eval's
    # from the adapter attached; in float32 they are the same model to float precision
    sets = ["rounds=2", "model.dtype=float32", "eval.rouge_samples=4", "data.validation=8"]
    run_experiment(load_config(TINY, sets), out, progress=False)
    return out


def test_eval_scores_the_run_s_own_sets_as_the_run_did(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["examples"] == summary["heldout_examples"] == 16
    assert set(result["trained"]) == set(summary["per_round"])  # loss, rougeL, validation_…
    for metric, points in summary["per_round"].items():
        assert result["base"][metric] == pytest.approx(points["0"], rel=1e-5, abs=1e-6)
        assert result["trained"][metric] == pytest.approx(points["2"], rel=1e-4, abs=1e-5)
    assert result["trained"]["loss"] < result["base"]["loss"]  # the run learned


def test_eval_on_another_source_scores_all_of_it(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i)} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(run), "--data", str(data), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert f"every example of {data} (5 examples, instruction)" in table
    assert "| metric | base model | with the adapter | change |" in table
    trained = load_trained(run)
    direct = evaluate_trained(trained, str(data), progress=False)
    assert f"| loss | {direct['base']['loss']:.4f} | {direct['trained']['loss']:.4f} |" in table
    out = tmp_path / "sample.json"
    limited = ["--set", "data.limit=3", "--json", str(out)]
    assert main(["eval", str(run), "--data", str(data), "--quiet", *limited]) == 0
    result = json.loads(out.read_text())
    assert result["scored"] == f"a sample of {data} (data.limit, drawn with seed 0)"
    assert result["examples"] == 3
    assert result["overrides"] == ["data.limit=3"]
    assert result["provenance"]["versions"]["peft"] is not None
    whole = ["--set", "data.limit=5", "--json", str(out)]  # a limit that keeps every example
    assert main(["eval", str(run), "--data", str(data), "--quiet", *whole]) == 0
    assert json.loads(out.read_text())["scored"] == f"every example of {data}"


def test_generate_puts_the_base_answer_beside_the_trained_one(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(run), "hello there", "what is up", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    trained = load_trained(run)
    model, tokenizer = trained.loaded.model, trained.loaded.tokenizer
    ids = [encode_prompt(Example(prompt=p, response=""), tokenizer) for p in ("hello there",)]
    base = generate_greedy(model, tokenizer, ids, 6)[0]
    peft_model = adapters.attach_factors(model, trained.cfg.model.targets, trained.factors)
    tuned = generate_greedy(peft_model, tokenizer, ids, 6)[0]
    adapters.detach(peft_model)
    assert f"prompt:  hello there\nbase:    {base}\ntrained: {tuned}\n" in printed
    assert printed.count("prompt:  ") == 2


def test_sampled_answers_repeat_for_a_seed(run: Path) -> None:
    trained = load_trained(run)
    a = generate_answers(trained, ["hi"], 8, temperature=1.5, seed=3)
    b = generate_answers(trained, ["hi"], 8, temperature=1.5, seed=3)
    assert a == b
    assert not adapters.lora_layers_present(trained.loaded.model)  # the adapter came off
    with pytest.raises(ConfigError, match=r"temperature >= 0 and top_p in \(0, 1\]"):
        generate_answers(trained, ["hi"], 8, temperature=1.0, top_p=0.0)


def test_a_bad_run_folder_or_adapter_is_named_before_any_model_loads(
    run: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        ConfigError, match=r"nothing is not a run folder: .*config\.json cannot be read"
    ):
        load_trained(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"no adapter at .*elsewhere \(adapter_config\.json"):
        load_trained(run, adapter=tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"unknown config key 'nope'"):
        load_trained(run, ["nope=1"])
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_lm_evaluation_harness_scores_the_adapter_as_fedlora_does(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "harness.json"
    argv = ["eval", str(run), "--harness", str(tmp_path / "task"), "--data", "mmlu"]
    assert main([*argv, "--set", "data.limit=12", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 12 and result["dtype"] == "float32"
    assert result["lm_eval_acc"] == result["fedlora_accuracy"]
    assert result["max_relative_score_gap"] < 1e-4  # the same option scores, up to one shift
    pairs = zip(result["fedlora_scores"], result["lm_eval_scores"], strict=True)
    shifts = [h[0] - f[0] for f, h in pairs]
    assert all(s < 0 for s in shifts)  # lm-eval's one extra token: a log-probability, negative
    table = capsys.readouterr().out
    assert "| lm-evaluation-harness (`hf`, `peft=`) |" in table
    assert (tmp_path / "task" / "fedlora_choices.yaml").is_file()

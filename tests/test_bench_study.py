"""Benchmark studies: a grid of runs from a study file, statistics over seeds, reuse of finished
runs, and the results written as JSON, markdown and PNG."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from fedlora.adapters import read_adapter
from fedlora.bench.study import (
    adapter_update_norm,
    beyond_spread,
    differences_at_bytes,
    load_study,
    paired_test,
    ranges_disjoint,
    recheck_at_bytes,
    recheck_decisions,
    run_study,
    spread,
    tuning_from,
    tuning_key,
    value_within_bytes,
)
from fedlora.cli import main
from fedlora.config import to_dict
from fedlora.errors import ConfigError
from fedlora.report import higher_is_better

TINY = (Path(__file__).parent.parent / "configs" / "tiny.toml").resolve()
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def study_file(tmp_path: Path, body: str = "") -> Path:
    path = tmp_path / "mini.toml"
    path.write_text(
        f"""name = "mini"
title = "A tiny study"
config = "{TINY}"
set = ["rounds=1", "train.steps=2"]
gpu_set = ["train.steps=50"]
seeds = [0, 1]
metrics = ["loss", "perplexity"]
reference = "flora"
reference_variant = "het"
{body}
[[variant]]
name = "het"
set = ["clients.ranks=[8,4,2]"]
strategies = ["flora", "zeropad"]

[[variant]]
name = "hom"
set = ["clients.ranks=[4]"]
strategies = ["flora", "fedit"]
"""
    )
    return path


def test_a_study_runs_its_grid_and_reports_mean_and_spread_over_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = study_file(tmp_path)
    out, work = tmp_path / "results", tmp_path / "runs"
    argv = ["bench", "study", str(path), "--out", str(out), "--workdir", str(work)]
    assert main(argv) == 0
    payload = json.loads((out / "mini.json").read_text())
    assert payload["seeds"] == [0, 1] and payload["gpu"] is False
    prov = payload["provenance"]
    assert prov["versions"]["torch"] and prov["versions"]["fedlora"]
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    from fedlora.precision import cpu_has_native_bf16

    assert prov["machine"]["cpu_native_bf16"] is cpu_has_native_bf16()  # what auto follows
    assert prov["machine"]["cpu_model"] is None or prov["machine"]["cpu_model"]
    assert len(payload["cells"]) == 8 and not any(c["reused"] for c in payload["cells"])
    for variant, strategies in (("het", ["flora", "zeropad"]), ("hom", ["flora", "fedit"])):
        for strategy in strategies:
            finals = []
            for seed in (0, 1):
                run = work / variant / strategy / f"seed-{seed}"
                summary = json.loads((run / "summary.json").read_text())
                assert summary["strategy"] == strategy and summary["rounds"] == 1
                config = json.loads((run / "config.json").read_text())
                assert config["seed"] == seed and config["train"]["steps"] == 2  # no GPU here
                finals.append(summary["final"])
            stats = payload["variants"][variant]["strategies"][strategy]["loss"]
            assert stats["values"] == finals
            assert stats["mean"] == pytest.approx(statistics.fmean(finals))
            assert stats["std"] == pytest.approx(statistics.stdev(finals))
        diff = payload["variants"][variant]["differences"]["loss"][strategies[1]]
        flora = payload["variants"][variant]["strategies"]["flora"]["loss"]["values"]
        other = payload["variants"][variant]["strategies"][strategies[1]]["loss"]["values"]
        diffs = [o - f for o, f in zip(other, flora, strict=True)]
        assert diff["mean"] == pytest.approx(statistics.fmean(diffs))
        assert diff["beyond_spread"] == beyond_spread(diffs)
        assert diff["decided"] == paired_test(diffs)["decided"]
        assert diff["ranges_disjoint"] == ranges_disjoint(other, flora)
    across = payload["variants"]["hom"]["differences_from_variant"]["loss"]
    het = payload["variants"]["het"]["strategies"]["flora"]["loss"]["values"]
    hom = payload["variants"]["hom"]["strategies"]["flora"]["loss"]["values"]
    assert list(across) == ["flora"]  # fedit and zeropad are not in both variants
    assert across["flora"]["mean"] == pytest.approx(statistics.fmean(hom) - statistics.fmean(het))
    assert "differences_from_variant" not in payload["variants"]["het"]
    for cell in payload["cells"]:  # ‖ΔW‖ of each run's exported adapter, from its factors
        run = work / cell["variant"] / cell["strategy"] / f"seed-{cell['seed']}"
        deltas = [f.delta() for f in read_adapter(run / "adapter").values()]
        dense = math.sqrt(sum(float(torch.linalg.norm(d)) ** 2 for d in deltas))
        assert cell["update_norm"] == pytest.approx(dense, rel=1e-5) and dense > 0
    table = (out / "mini.md").read_text()
    assert "| ‖ΔW‖ |" in table
    assert "## het" in table and "| zeropad |" in table and "Difference from flora" in table
    het = [c for c in payload["cells"] if c["variant"] == "het"]
    at_bytes = payload["variants"]["het"]["differences_at_bytes"]
    assert at_bytes == differences_at_bytes(het, ["loss", "perplexity"], "flora")
    # zero-padding downloads its rank of the global adapter in round 1, FLoRA's clients start
    # fresh: within FLoRA's bytes zero-padding is scored on the base model (round 0)
    row = at_bytes["loss"]["zeropad"]
    assert (row["rounds"], row["reference_rounds"]) == ([0, 0], [1, 1])
    assert "Difference from flora at equal bytes" in table
    assert (out / "mini.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out

    assert main([*argv, "--seeds", "1"]) == 0  # finished runs are reused, not rerun
    again = json.loads((out / "mini.json").read_text())
    assert [c["seed"] for c in again["cells"]] == [1, 1, 1, 1]
    assert all(c["reused"] for c in again["cells"])


def test_a_run_without_an_adapter_has_no_update_norm(tmp_path: Path) -> None:
    assert adapter_update_norm(tmp_path) is None  # standalone exports no global adapter


def test_a_benchmarks_loss_is_lower_is_better() -> None:
    assert not higher_is_better("mmlu_loss") and higher_is_better("mmlu_accuracy")
    assert higher_is_better("rougeL") and not higher_is_better("perplexity")


def test_spread_and_overlap() -> None:
    s = spread([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(
        statistics.stdev([1, 2, 4])
    )
    assert (s["min"], s["max"], s["n"]) == (1.0, 4.0, 3)
    assert spread([2.0])["std"] == 0.0
    assert ranges_disjoint([1.0, 2.0], [2.5, 3.0]) and not ranges_disjoint([1.0, 2.6], [2.5, 3.0])
    assert not ranges_disjoint([1.0], [2.0])  # one seed has no spread
    assert beyond_spread([-0.2, -0.22, -0.19])  # same sign, mean far above the sd
    assert not beyond_spread([-0.2, 0.01, -0.3])  # signs differ
    assert not beyond_spread([-0.01, -0.5, -0.02])  # same sign, but sd above |mean|
    assert not beyond_spread([-0.2])


@pytest.mark.parametrize(
    ("diffs", "t", "p", "decided"),
    [
        # mean −0.2033, sd 0.01528, t = mean / (sd / √3) = −23.05, df 2: p = 0.0019
        ([-0.2, -0.22, -0.19], -23.05, 0.0019, True),
        # the old rule's "larger than the spread" (same sign, |mean| > sd): t = −1.87, df 2,
        # p = 0.20, not decided at 95 %
        ([-0.05, -0.01, -0.12], -1.87, 0.20, False),
        ([-0.05, -0.01, -0.12, -0.06, -0.04, -0.07], -3.91, 0.0113, True),  # 6 seeds: decided
        ([0.1, -0.1], 0.0, 1.0, False),
    ],
)
def test_a_difference_is_decided_by_a_paired_t_test_at_95_percent(
    diffs: list[float], t: float, p: float, decided: bool
) -> None:
    test = paired_test(diffs)

    assert test["df"] == len(diffs) - 1
    assert test["t"] == pytest.approx(t, abs=0.01)
    assert test["p"] == pytest.approx(p, abs=0.0005 if p < 0.02 else 0.01)
    assert test["decided"] is decided


def test_fewer_than_two_seeds_decide_nothing_and_no_spread_decides_a_nonzero_mean() -> None:
    assert paired_test([-0.3])["decided"] is False
    assert paired_test([0.2, 0.2, 0.2])["decided"] is True
    assert paired_test([0.0, 0.0])["decided"] is False


@pytest.mark.parametrize(
    "body,message",
    [
        ('colour = "red"\n', "unknown key 'colour'"),
        ("", "seeds must be"),
    ],
)
def test_bad_study_files_name_the_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    path = study_file(tmp_path, body)
    if message == "seeds must be":
        path.write_text(path.read_text().replace("seeds = [0, 1]", "seeds = []"))
    with pytest.raises(ConfigError, match=message) as err:
        load_study(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("find", "replace", "message"),
    [
        ("seeds = [0, 1]", 'seeds = [0, "1"]', r"seeds\[1\]: expected int, got '1'"),
        ('title = "A tiny study"', "title = 3", "title: 3 is not a valid str or none"),
        (
            'reference = "flora"',
            'reference = "flora"\nagainst_bytes = "yes"',
            "against_bytes: expected bool",
        ),
        (
            'name = "hom"',
            'name = "hom"\ncolour = 1',
            r"variant 2: unknown key 'colour'; allowed in a \[\[variant\]\]: name, set, strategies",
        ),
        (
            'strategies = ["flora", "fedit"]',
            'strategies = "flora"',
            "variant 2: strategies: expected a list of str",
        ),
    ],
)
def test_a_study_file_is_typed_like_a_run_config(
    tmp_path: Path, find: str, replace: str, message: str
) -> None:
    path = study_file(tmp_path)
    assert find in path.read_text()
    path.write_text(path.read_text().replace(find, replace))

    with pytest.raises(ConfigError, match=message) as err:
        load_study(path)
    assert str(err.value).startswith(str(path))


def test_a_bad_config_key_in_a_study_fails_before_any_run(tmp_path: Path) -> None:
    path = study_file(tmp_path)
    path.write_text(path.read_text().replace('"train.steps=2"', '"train.stepz=2"'))
    argv = [
        "bench",
        "study",
        str(path),
        "--out",
        str(tmp_path / "o"),
        "--workdir",
        str(tmp_path / "w"),
    ]
    assert main(argv) == 2
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in BENCHMARKS.glob("*.toml")))
def test_the_shipped_study_files_load_and_build_every_config(name: str) -> None:
    study = load_study(BENCHMARKS / name)
    assert len(study.seeds) >= 1
    for variant in study.variants:
        for strategy in variant.strategies:
            cfg = study.run_config(variant, strategy, study.seeds[0])
            assert cfg.label == strategy
            tune = study.tune
            for lr in tune.lrs if tune is not None else []:
                assert tune is not None
                tuning = study.tune_config(variant, strategy, lr)
                assert tuning.train.lr == lr and tuning.eval.split == "heldout"
                assert tuning_key(tuning, tune.metric).startswith("validation_")
                same = study.run_config(variant, strategy, tune.seed, [f"train.lr={lr!r}"])
                assert to_dict(tuning) == to_dict(same)  # a tuned cell reuses its tuning run


# --- learning-rate tuning ---------------------------------------------------------------------


def tune_file(tmp_path: Path, tune: str, data: str = '"data.validation=12", ') -> Path:
    path = tmp_path / "tuned.toml"
    path.write_text(
        f"""name = "tuned"
config = "{TINY}"
set = [{data}"rounds=1", "train.steps=3"]
seeds = [0, 1]
metrics = ["loss"]
reference = "flora"

[tune]
{tune}

[[variant]]
name = "het"
set = ["clients.ranks=[8,4,2]"]
strategies = ["flora", "zeropad"]
"""
    )
    return path


def test_each_strategy_runs_its_best_validation_lr_on_every_seed_beside_the_fixed_lr(
    tmp_path: Path,
) -> None:
    # tiny.toml trains at lr 3e-3: the grid holds it, so a tuned cell may be a fixed one reused
    path = tune_file(tmp_path, "lrs = [3e-3, 0.5]\nseed = 1")
    out, work = tmp_path / "results", tmp_path / "runs"
    argv = ["bench", "study", str(path), "--out", str(out), "--workdir", str(work)]
    assert main(argv) == 0
    payload = json.loads((out / "tuned.json").read_text())

    assert list(payload["variants"]) == ["het", "het-tuned"]
    cells = {(c["variant"], c["strategy"], c["seed"]): c for c in payload["cells"]}
    for strategy in ("flora", "zeropad"):
        scores, tests, seconds = {}, {}, {}
        for lr in ("0.003", "0.5"):  # the tuning runs: seed 1, chosen by the validation split
            run = work / "tune" / "het" / strategy / f"lr-{lr}"
            summary = json.loads((run / "summary.json").read_text())
            config = json.loads((run / "config.json").read_text())
            assert summary["eval_split"] == "heldout" and summary["heldout_examples"] == 16
            assert config["seed"] == 1 and config["train"]["lr"] == float(lr)
            scores[lr] = summary["per_round"]["validation_loss"]["1"]
            tests[lr] = summary["final"]
            seconds[lr] = summary["seconds"]
            assert scores[lr] != tests[lr]  # two sets
        entry = payload["tuning"]["het"][strategy]
        assert entry["scores"] == scores
        assert entry["runs"] == {
            lr: str(work / "tune" / "het" / strategy / f"lr-{lr}") for lr in scores
        }
        assert entry["seconds"] == seconds
        best = min(scores, key=lambda lr: scores[lr])  # loss: lower is better
        assert entry["best"] == best
        for seed in (0, 1):
            tuned = payload["configs"][f"het-tuned/{strategy}/seed-{seed}"]
            fixed = payload["configs"][f"het/{strategy}/seed-{seed}"]
            assert tuned["train"]["lr"] == float(best) and fixed["train"]["lr"] == 3e-3
            assert tuned["eval"]["split"] == fixed["eval"]["split"] == "heldout"
        # on the tuning seed, the tuned cell is its tuning run, reported on the test split
        assert cells[("het-tuned", strategy, 1)]["reused"]
        assert cells[("het-tuned", strategy, 1)]["final"]["loss"] == tests[best]
        assert not (work / "het-tuned" / strategy / "seed-1").exists()
        assert cells[("het", strategy, 1)]["final"]["loss"] == tests["0.003"]
        assert not cells[("het-tuned", strategy, 0)]["reused"] or best == "0.003"
    for strategy in ("flora", "zeropad"):  # a tuned lr equal to the config's: the same run
        if payload["tuning"]["het"][strategy]["best"] == "0.003":
            for seed in (0, 1):
                assert cells[("het-tuned", strategy, seed)]["reused"]
                assert (
                    cells[("het-tuned", strategy, seed)]["final"]
                    == (cells[("het", strategy, seed)]["final"])
                )
    table = (out / "tuned.md").read_text()
    assert "## Learning-rate tuning" in table and "| strategy | lr 0.003 | lr 0.5 |" in table
    assert "## het-tuned" in table


def test_a_study_may_tune_on_one_variant_and_give_its_lrs_to_every_variant(
    tmp_path: Path,
) -> None:
    path = tune_file(tmp_path, 'lrs = [3e-3, 0.5]\nvariant = "het"\nfixed = false')
    text = path.read_text().replace("seeds = [0, 1]", "seeds = [0]")
    path.write_text(
        text + '\n[[variant]]\nname = "hom"\nset = ["clients.ranks=[4,4,4]"]\n'
        'strategies = ["zeropad"]\n'
    )
    out, work = tmp_path / "results", tmp_path / "runs"
    assert main(["bench", "study", str(path), "--out", str(out), "--workdir", str(work)]) == 0
    payload = json.loads((out / "tuned.json").read_text())
    assert list(payload["tuning"]) == ["het"]  # one grid, on the named variant
    assert sorted(p.name for p in (work / "tune").iterdir()) == ["het"]
    assert list(payload["variants"]) == ["het-tuned", "hom-tuned"]
    best = payload["tuning"]["het"]["zeropad"]["best"]
    assert payload["configs"]["hom-tuned/zeropad/seed-0"]["train"]["lr"] == float(best)
    assert payload["configs"]["hom-tuned/zeropad/seed-0"]["clients"]["ranks"] == [4, 4, 4]
    assert "on the variant `het` alone" in (out / "tuned.md").read_text()


def test_a_seeds_study_takes_the_lrs_its_tuning_study_chose_on_another_variant(
    tmp_path: Path,
) -> None:
    tuning = tune_file(tmp_path, "lrs = [3e-3, 0.5]\nonly = true")
    out, work = tmp_path / "results", tmp_path / "runs"
    assert main(["bench", "study", str(tuning), "--out", str(out), "--workdir", str(work)]) == 0
    best = json.loads((out / "tuned.json").read_text())["tuning"]["het"]["zeropad"]["best"]
    seeds = tmp_path / "hom.toml"
    seeds.write_text(
        f"""name = "hom"
config = "{TINY}"
set = ["data.validation=12", "rounds=1", "train.steps=3"]
seeds = [0]

[tune]
results = "{out / "tuned.json"}"
variant = "het"
fixed = false

[[variant]]
name = "hom"
set = ["clients.ranks=[4,4,4]"]
strategies = ["zeropad"]
"""
    )
    study = load_study(seeds)
    result = run_study(study, tmp_path / "hom-runs")
    [cell] = result.cells
    assert cell.variant == "hom-tuned" and not cell.reused  # other ranks: a run of its own
    config = result.configs["hom-tuned/zeropad/seed-0"]
    assert config["train"]["lr"] == float(best) and config["clients"]["ranks"] == [4, 4, 4]
    wrong = seeds.read_text().replace('variant = "het"', 'variant = "nope"')
    seeds.write_text(wrong)
    with pytest.raises(ConfigError, match=r"no tuned lr for variant 'nope', strategy 'zeropad'"):
        run_study(load_study(seeds), tmp_path / "w")


@pytest.mark.parametrize(
    ("tune", "extra", "message"),
    [
        ('lrs = [3e-3, 0.5]\nvariant = "nope"', "", r"variant 'nope' is not a variant"),
        (
            'lrs = [3e-3, 0.5]\nvariant = "het"',
            '\n[[variant]]\nname = "hom"\nstrategies = ["fedit"]\n',
            r"variant 'hom' runs 'fedit', which the tuned variant 'het' does not tune",
        ),
    ],
)
def test_a_tuned_variant_must_exist_and_tune_every_strategy_the_others_run(
    tmp_path: Path, tune: str, extra: str, message: str
) -> None:
    path = tune_file(tmp_path, tune)
    path.write_text(path.read_text() + extra)
    with pytest.raises(ConfigError, match=message):
        load_study(path)


def test_best_lr_follows_the_metric_s_direction_and_skips_diverged_runs() -> None:
    from fedlora.bench.study import best_lr

    assert best_lr({"0.001": 2.0, "0.01": 1.5, "0.1": float("nan")}, "loss") == "0.01"
    assert best_lr({"0.001": 0.4, "0.01": 0.3}, "accuracy") == "0.001"
    assert best_lr({"0.01": 1.0, "0.001": 1.0}, "loss") == "0.001"  # a tie: the smaller lr
    assert best_lr({"0.01": None, "0.001": float("inf")}, "loss") == "0.001"


@pytest.mark.parametrize(
    ("tune", "data", "message"),
    [
        ("lrs = [1e-3]", '"data.validation=12", ', "at least two distinct lrs"),
        ("lrs = [1e-3, -1.0]", '"data.validation=12", ', "at least two distinct lrs"),
        ('lrs = [1e-3, 1e-2]\nmetric = "accuracy"', '"data.validation=12", ', "not one of"),
        ("lrs = [1e-3, 1e-2]\nstep = 1", '"data.validation=12", ', "unknown key 'step'"),
        ("lrs = [1e-3, 1e-2]", "", r"chooses by the validation split.*set data\.validation"),
    ],
)
def test_a_bad_tune_section_fails_before_any_run(
    tmp_path: Path, tune: str, data: str, message: str
) -> None:
    path = tune_file(tmp_path, tune, data)
    with pytest.raises(ConfigError, match=message):
        study = load_study(path)
        run_study(study, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_study_plots_its_metrics_against_the_bytes_each_run_exchanged(tmp_path: Path) -> None:
    path = tmp_path / "bytes.toml"
    path.write_text(
        f"""name = "bytes"
config = "{TINY}"
set = ["rounds=2", "train.steps=1"]
seeds = [0]
reference = "flora"
against_bytes = true

[[variant]]
name = "het"
set = ["clients.ranks=[8,4,2]"]
strategies = ["flora", "hafl-freeze"]
"""
    )
    out, work = tmp_path / "results", tmp_path / "runs"
    assert main(["bench", "study", str(path), "--out", str(out), "--workdir", str(work)]) == 0
    payload = json.loads((out / "bytes.json").read_text())
    for cell in payload["cells"]:
        run = work / "het" / cell["strategy"] / "seed-0"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        total, expected = 0.0, {}
        for row in rows:  # by hand from every client's recorded traffic
            total += sum(t["up_bytes"] + t["down_bytes"] for t in row["traffic"])
            expected[str(row["round"])] = total
        assert cell["cumulative_bytes"] == expected and total > 0
        curve = payload["variants"]["het"]["strategies"][cell["strategy"]]["curves"]
        assert curve["cumulative_mb"]["2"]["mean"] == pytest.approx(total / 1e6)
    assert (out / "bytes-bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert "bytes-bytes.png" in (out / "bytes.md").read_text()
    # HAFL's rank-1 global pair travels lighter than FLoRA's stack from round 2: a verdict at
    # equal bytes too, from the cells as the JSON keeps them
    at_bytes = payload["variants"]["het"]["differences_at_bytes"]
    assert at_bytes == differences_at_bytes(payload["cells"], ["loss"], "flora")
    assert list(at_bytes["loss"]) == ["hafl-freeze"]
    assert "Difference from flora at equal bytes" in (out / "bytes.md").read_text()


def test_a_tuning_study_and_a_seeds_study_that_takes_its_lrs_split_the_work(
    tmp_path: Path,
) -> None:
    tuning = tune_file(tmp_path, "lrs = [3e-3, 0.5]\nonly = true")
    out, work = tmp_path / "results", tmp_path / "runs"
    assert main(["bench", "study", str(tuning), "--out", str(out), "--workdir", str(work)]) == 0
    tuned = json.loads((out / "tuned.json").read_text())
    tuning_seconds = [s for e in tuned["tuning"]["het"].values() for s in e["seconds"].values()]
    assert tuned["run_seconds"] == pytest.approx(sum(tuning_seconds)) and len(tuning_seconds) == 4
    assert not (work / "het").exists()  # only the grid ran
    assert "## Learning-rate tuning" in (out / "tuned.md").read_text()
    best = {s: tuned["tuning"]["het"][s]["best"] for s in ("flora", "zeropad")}

    seeds = tune_file(tmp_path, f'results = "{out / "tuned.json"}"\nfixed = false')
    seeds.write_text(seeds.read_text().replace('name = "tuned"', 'name = "seeds"'))
    elsewhere = tmp_path / "seeds-runs"
    assert main(["bench", "study", str(seeds), "--out", str(out), "--workdir", str(elsewhere)]) == 0
    payload = json.loads((out / "seeds.json").read_text())
    assert list(payload["variants"]) == ["het-tuned"]
    cells = {(c["strategy"], c["seed"]): c for c in payload["cells"]}
    for strategy, lr in best.items():
        for seed in (0, 1):
            config = payload["configs"][f"het-tuned/{strategy}/seed-{seed}"]
            assert config["train"]["lr"] == float(lr)
        # seed 0, the tuning seed: the tuning study's run, found in its folder, not run again
        run = Path(tuned["tuning"]["het"][strategy]["runs"][lr])
        assert cells[(strategy, 0)]["reused"] and not cells[(strategy, 1)]["reused"]
        summary = json.loads((run / "summary.json").read_text())
        assert cells[(strategy, 0)]["final"]["loss"] == summary["final"]
        assert not (elsewhere / "het-tuned" / strategy / "seed-0").exists()
        assert (elsewhere / "het-tuned" / strategy / "seed-1" / "summary.json").is_file()

    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    seeds.write_text(seeds.read_text().replace(str(out / "tuned.json"), str(empty)))
    with pytest.raises(ConfigError, match="holds no lr tuning"):
        run_study(load_study(seeds), tmp_path / "w")


def test_committed_decisions_are_rechecked_under_the_paired_t_test(tmp_path: Path) -> None:
    flora = [1.0, 1.1, 1.2]
    payload = {
        "reference": "flora",
        "variants": {
            "v": {
                "strategies": {
                    "flora": {"loss": {"values": flora}},
                    "fedit": {"loss": {"values": [1.05, 1.11, 1.32]}},  # old rule: yes; t: no
                    "zeropad": {"loss": {"values": [1.5, 1.6, 1.71]}},  # decided both ways
                },
                "differences": {
                    "loss": {
                        "fedit": {"mean": 0.06, "beyond_spread": True},
                        "zeropad": {"mean": 0.5033, "beyond_spread": True},
                    }
                },
            }
        },
    }
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "s.json").write_text(json.dumps(payload))

    total, changed = recheck_decisions(tmp_path)

    assert total == 2
    assert [(c["strategy"], c["decided"]) for c in changed] == [("fedit", False)]


def _cell(strategy: str, seed: int, losses: list[float], spent: list[float]) -> dict[str, object]:
    return {
        "variant": "v",
        "strategy": strategy,
        "seed": seed,
        "per_round": {"loss": {str(r): v for r, v in enumerate(losses)}},
        "cumulative_bytes": {str(r): b for r, b in enumerate(spent)},
    }


def test_methods_whose_traffic_differs_are_also_compared_at_equal_bytes(tmp_path: Path) -> None:
    cells = [
        # FLoRA exchanges 100 bytes a round, "cheap" 40: within cheap's 80 FLoRA reached round 0
        _cell("flora", 0, [3.0, 2.0, 1.5], [0, 100, 200]),
        _cell("flora", 1, [3.1, 2.1, 1.6], [0, 100, 200]),
        _cell("cheap", 0, [3.0, 2.5, 1.8], [0, 40, 80]),
        _cell("cheap", 1, [3.1, 2.5, 1.9], [0, 40, 80]),
        _cell("same", 0, [3.0, 2.2, 1.7], [0, 100, 200]),  # the same traffic: no row
        _cell("same", 1, [3.1, 2.2, 1.7], [0, 100, 200]),
        _cell("central", 0, [3.0, 1.0, 0.5], [0, 0, 0]),  # no traffic: no row
        _cell("central", 1, [3.1, 1.0, 0.5], [0, 0, 0]),
    ]
    assert value_within_bytes(cells[0], "loss", 80.0) == (0, 3.0)
    assert value_within_bytes(cells[0], "loss", 100.0) == (1, 2.0)
    assert value_within_bytes(cells[2], "loss", 80.0) == (2, 1.8)

    rows = differences_at_bytes(cells, ["loss"], "flora")

    assert list(rows["loss"]) == ["cheap"]
    row = rows["loss"]["cheap"]
    assert row["mean"] == pytest.approx(statistics.fmean([1.8 - 3.0, 1.9 - 3.1]))
    assert (row["rounds"], row["reference_rounds"]) == ([2, 2], [0, 0])
    assert row["budget_mb"]["mean"] == pytest.approx(80 / 1e6)
    assert row["decided"] == paired_test([1.8 - 3.0, 1.9 - 3.1])["decided"] and row["better"]

    # the recheck of committed JSON reads the same cells, beside the final round's decision
    payload = {
        "reference": "flora",
        "metrics": ["loss"],
        "variants": {"v": {"differences": {"loss": {"cheap": {"mean": 0.3, "decided": True}}}}},
        "cells": cells,
    }
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "s.json").write_text(json.dumps(payload))
    [again] = recheck_at_bytes(tmp_path)
    assert again["strategy"] == "cheap" and again["mean"] == pytest.approx(row["mean"])
    assert again["final_mean"] == 0.3 and again["final_decided"] is True


def test_a_seeds_study_takes_each_strategys_lr_from_the_first_tuning_file_that_has_it(
    tmp_path: Path,
) -> None:
    def tuning(path: Path, bests: dict[str, str]) -> Path:
        entries = {
            s: {"metric": "loss", "scores": {lr: 1.0}, "best": lr} for s, lr in bests.items()
        }
        path.write_text(json.dumps({"tuning": {"het": entries}}))
        return path

    rerun = tuning(tmp_path / "rerun.json", {"zeropad": "0.01"})  # a rerun of one method
    first = tuning(tmp_path / "first.json", {"flora": "0.003", "zeropad": "0.001"})
    path = tune_file(tmp_path, f'results = ["{rerun}", "{first}"]\nfixed = false')

    study = load_study(path)

    assert study.tune is not None and study.tune.results == (rerun, first)
    picked = {s: e["best"] for s, e in tuning_from(study, study.tune.results)["het"].items()}
    assert picked == {"flora": "0.003", "zeropad": "0.01"}
    only_rerun = tune_file(tmp_path, f'results = ["{rerun}"]\nfixed = false')
    with pytest.raises(ConfigError, match="no tuned lr for variant 'het', strategy 'flora'"):
        run_study(load_study(only_rerun), tmp_path / "w")
    with pytest.raises(ConfigError, match="a list of paths"):
        load_study(tune_file(tmp_path, "results = [1]\nfixed = false"))


def test_a_finished_run_in_another_compute_dtype_is_run_again_not_reused(tmp_path: Path) -> None:
    from fedlora.bench.study.run import _done, _dtype_now
    from fedlora.config import load_config

    cfg = load_config(TINY, ["model.dtype=auto"])
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))
    here = _dtype_now(cfg)
    other = "bfloat16" if here == "float32" else "float32"
    (out / "summary.json").write_text(json.dumps({"dtype": here, "final": 1.0}))
    assert _done(out, cfg) == {"dtype": here, "final": 1.0}
    (out / "summary.json").write_text(json.dumps({"dtype": other, "final": 1.0}))
    assert _done(out, cfg) is None  # "auto" resolved otherwise where it ran: not this cell
    assert _done(out, load_config(TINY, ["model.dtype=auto", "rounds=7"])) is None

"""The typed config: TOML file, --set overrides, and errors that say what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.config import RunConfig, load_config, parse_override
from fedlora.errors import ConfigError
from fedlora.methods import REGISTRY

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_defaults_are_the_demo_run() -> None:
    cfg = load_config()

    assert cfg == RunConfig()
    assert cfg.strategy == "flora" and cfg.model.name == "smollm2-135m"
    assert len(set(cfg.clients.ranks)) >= 2 and cfg.clients.num_clients >= 3 and cfg.rounds >= 2


def test_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('strategy = "flexlora"\nrounds = 3\n[clients]\nranks = [8, 4]\n')

    cfg = load_config(path, ["clients.num_clients=5", "train.lr=0.001", "data.source=mmlu"])

    assert (cfg.strategy, cfg.rounds, cfg.clients.ranks) == ("flexlora", 3, [8, 4])
    assert (cfg.clients.num_clients, cfg.train.lr, cfg.data.source) == (5, 0.001, "mmlu")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rounds=0"], "rounds must be >= 1"),
        (["strategy=fedavg"], "choose one of " + ", ".join(sorted(REGISTRY))),
        (["clients.rankz=[4]"], "unknown config key 'clients.rankz'.*allowed in clients: alpha"),
        (["nosuch=1"], "unknown config key 'nosuch'; allowed in the top level"),
        (["rounds=two"], "rounds: expected int, got 'two'"),
        (["train.lr=true"], "train.lr: expected float"),
        (["clients.ranks=[4, 0]"], "ranks >= 1"),
        (["clients.fraction=1.5"], "clients.fraction must be in"),
        (["data.partition=random"], "choose one of iid, dirichlet, classes, task"),
        (["rounds"], "--set expects key=value"),
    ],
)
def test_bad_values_are_rejected_with_what_is_allowed(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('strategy = "flora"\nrounds = = 2\n')

    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML.*line 2"):
        load_config(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothere\.toml does not exist"):
        load_config(tmp_path / "nothere.toml")


def test_override_values_are_read_as_toml_or_text() -> None:
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("x=flora") == ("x", "flora")
    assert parse_override("x=none") == ("x", "none")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)

    assert isinstance(cfg, RunConfig)


def test_configs_are_shipped() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rounds=0"], "rounds must be >= 1, got 0"),
        (["clients.num_clients=0"], "clients.num_clients must be >= 1"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["train.batch_size=0"], "train.batch_size must be >= 1"),
        (["train.grad_accum=0"], "train.grad_accum must be >= 1"),
        (["model.max_length=4"], "model.max_length must be >= 8"),
        (["data.heldout=0"], "data.heldout must be >= 1"),
        (["eval.batch_size=0"], "eval.batch_size must be >= 1"),
        (["eval.every=0"], "eval.every must be >= 1"),
        (["eval.benchmark=chatterbot"], "the training source itself"),
        (["eval.benchmark_examples=0"], "eval.benchmark_examples must be >= 1"),
        (["clients.fraction=0"], r"clients.fraction must be in \(0, 1\]"),
        (["train.lr=0"], "train.lr must be > 0"),
        (["hetlora.gamma=1.0"], r"hetlora.gamma must be in \(0, 1\)"),
        (["hetlora.reg=-1"], "hetlora.reg must be >= 0"),
        (["adalora.target_ratio=0"], r"adalora.target_ratio must be in \(0, 1\]"),
        (["adalora.tinit=0.6", "adalora.tfinal=0.5"], "with a sum below 1"),
        (["adalora.delta_t=0"], "adalora.delta_t must be >= 1"),
        (["export_rank=0"], "export_rank must be >= 1"),
        (["clients.min_clients=4"], "clients.min_clients must be in 1 … clients.num_clients = 3"),
        (["clients.fraction=0.34", "clients.min_clients=2"], "more than the 1 clients sampled"),
        (["clients.retries=-1"], "clients.retries must be >= 0"),
        (["faults.crash_before=1.5"], r"faults.crash_before must be a probability in \[0, 1\]"),
        (["faults.timeout=0.6", "faults.straggler=0.6"], "the fault probabilities sum to 1.2"),
        (["faults.straggler_work=0"], r"faults.straggler_work must be in \(0, 1\]"),
        (["flower.wait_nodes_s=0"], "flower.wait_nodes_s and flower.round_timeout_s must be > 0"),
        (["validation.max_norm=0"], "validation.max_norm must be > 0"),
        (["validation.max_examples=0"], "validation.max_examples must be >= 1"),
        (["privacy.clip_norm=-1"], "privacy.clip_norm and privacy.noise_multiplier must be >= 0"),
        (["privacy.delta=1"], r"privacy.delta must be in \(0, 1\)"),
        (["privacy.noise_multiplier=1"], "privacy.noise_multiplier is set but"),
        (["privacy.clip_norm=1", "strategy=standalone"], "'standalone' sends nothing"),
        (["privacy.clip_norm=1", "strategy=hafl-truncate"], "also send importance scores"),
        (["privacy.clip_norm=1", "strategy=flora-adalora"], "AdaLoRA's kept ranks"),
        (["weighting=custom"], 'weighting = "custom" and clients.weights go together'),
        (["weighting=custom", "clients.weights=[1, 0]"], "clients.weights must be positive"),
        (["data.kind=text"], "data.kind = 'text' is not allowed"),
        (["strategy=fedit"], "'fedit' needs every client at the same rank"),
    ],
)
def test_every_range_check_names_its_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_single_party_runs_are_a_mode_and_strategy_names_them_as_shorthand() -> None:
    centralized = load_config(None, ["mode=centralized"])
    shorthand = load_config(None, ["strategy=centralized"])

    assert (centralized.mode, centralized.label) == ("centralized", "centralized")
    assert shorthand == centralized and shorthand.strategy == RunConfig.strategy
    assert load_config().mode == "federated" and load_config().label == "flora"
    assert centralized.running("fedit").label == "fedit"
    assert centralized.running("fedit").mode == "federated"
    assert load_config().running("standalone").mode == "standalone"
    with pytest.raises(ConfigError, match="mode = 'federate' is not allowed; choose one of"):
        load_config(None, ["mode=federate"])
    with pytest.raises(ConfigError, match="strategy = 'standalone' and mode = 'centralized'"):
        load_config(None, ["mode=centralized", "strategy=standalone"])

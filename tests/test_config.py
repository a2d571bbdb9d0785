"""The typed config: TOML file, --set overrides, and errors that say what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.config import RunConfig, load_config, parse_override
from fedlora.errors import ConfigError

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
        (["strategy=fedavg"], "choose one of fedit, ffa, flexlora"),
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

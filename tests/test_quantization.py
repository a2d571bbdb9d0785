"""Quantized clients (``clients.quantization``): a client's frozen base in 8-bit or 4-bit through
bitsandbytes, float32 LoRA factors, and every merged update kept exactly beside it."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.federation import build_federation
from fedlora.lora import dense_delta
from fedlora.models import load_model
from fedlora.simulation import Runner

TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"


@pytest.mark.parametrize(
    ("quantization", "layer"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")]
)
def test_a_quantized_model_has_quantized_linear_layers_and_the_same_shapes(
    quantization: str, layer: str
) -> None:
    plain = load_model("tiny-llama", dtype="float32")
    quantized = load_model("tiny-llama", dtype="float32", quantization=quantization)
    q_proj = quantized.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    assert (q_proj.out_features, q_proj.in_features) == (64, 64)
    ids = torch.tensor([[5, 9, 17, 33, 60]])
    with torch.no_grad():
        a, b = plain.model(input_ids=ids).logits, quantized.model(input_ids=ids).logits
    assert not torch.equal(a, b)  # quantized weights: another model, close to the first
    assert (a - b).abs().max() < 0.5 * a.abs().max()


def test_quantized_clients_train_on_their_base_and_hold_every_merged_update_exactly(
    tmp_path: Path,
) -> None:
    sets = ["rounds=3", "model.dtype=float32", 'clients.quantization=["4bit", "none", "8bit"]']
    fed = build_federation(load_config(TINY, sets))
    runner = Runner(fed, tmp_path, progress=False)
    records = []
    outcome = runner.run(lambda record, snapshot: records.append(record))
    assert runner.server is not None and len(runner.server.merged) == 3  # FLoRA merges each round
    assert sorted(runner.quantized) == ["4bit", "8bit"]
    for q, (bench, held) in runner.quantized.items():
        assert held == [2]  # synced before its clients' last training: the merges of rounds 1, 2
        layer = type(bench.model.model.layers[0].self_attn.q_proj).__name__
        assert layer == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[q]
        for name in bench.shapes:
            expected = sum(dense_delta(d[name]) for d in runner.server.merged[:2])
            kept = bench.base.delta(name)
            assert kept is not None and torch.allclose(kept, expected, atol=1e-7)
            assert kept.dtype == torch.float32
    assert outcome.export is not None
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in records if r.round > 0)


def test_quantized_clients_send_other_updates_than_full_precision_ones(tmp_path: Path) -> None:
    def first_round_loss(extra: list[str]) -> float:
        fed = build_federation(load_config(TINY, ["rounds=1", "model.dtype=float32", *extra]))
        records = []
        Runner(fed, tmp_path / str(len(extra)), progress=False).run(
            lambda record, snapshot: records.append(record)
        )
        return float(records[-1].train_loss)

    plain = first_round_loss([])
    quantized = first_round_loss(['clients.quantization=["4bit"]'])
    assert quantized != plain and abs(quantized - plain) < 0.5 * plain


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['clients.quantization=["3bit"]'], r"clients\.quantization = '3bit' is not allowed"),
        (
            ["strategy=centralized", 'clients.quantization=["4bit"]'],
            r"clients\.quantization is for federated clients; 'centralized'",
        ),
    ],
)
def test_bad_quantization_settings_are_refused_at_config_time(
    sets: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, sets)


def test_a_missing_backend_is_named_before_anything_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(ConfigError, match=r"needs the package bitsandbytes: pip install"):
        load_config(TINY, ['clients.quantization=["8bit"]'])


def test_a_flower_node_holds_its_base_as_its_node_config_or_the_run_config_says() -> None:
    from fedlora.flower import apps

    cfg = load_config(TINY, ['clients.quantization=["none", "8bit"]'])

    def layer(node_config: dict[str, object]) -> str:
        _, bench = apps.node_party(cfg, node_config)
        return type(bench.model.model.layers[0].self_attn.q_proj).__name__

    assert layer({"partition-id": 0, "trust-server": True}) == "Linear"
    assert (
        layer({"partition-id": 1, "trust-server": True}) == "Linear8bitLt"
    )  # clients.quantization, cycled
    assert layer({"partition-id": 2, "trust-server": True}) == "Linear"
    assert layer({"partition-id": 0, "quantization": "4bit", "trust-server": True}) == "Linear4bit"
    with pytest.raises(ConfigError, match=r"node config quantization must be one of none, 8bit"):
        apps.node_party(cfg, {"partition-id": 0, "quantization": "2bit", "trust-server": True})


def test_the_quantization_bench_measures_each_client_in_a_process_of_its_own(
    tmp_path: Path,
) -> None:
    from fedlora.bench.quantization import format_quantization, run_quantization_bench

    overrides = ["rounds=1", "train.steps=1", "data.heldout=8", "model.dtype=float32"]
    bench = run_quantization_bench(
        tmp_path, model="tiny-llama", ranks=[4], steps=1, overrides=overrides
    )
    assert [(c.quantization, c.rank) for c in bench.clients] == [
        ("none", 4),
        ("8bit", 4),
        ("4bit", 4),
    ]
    weights = {c.quantization: c.weights_mb for c in bench.clients}
    assert weights["4bit"] < weights["8bit"] < weights["none"]
    assert all(c.peak_rss_mb > 100 and c.s_per_step > 0 for c in bench.clients)  # torch alone
    assert sorted(bench.runs) == ["4bit", "8bit", "none"]
    losses = {q: r["loss"] for q, r in bench.runs.items()}
    assert len(set(losses.values())) == 3  # each quantization trained other updates
    table = format_quantization(bench)
    assert "| 4bit | 4 |" in table and "| none | " in table


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_its_other_warnings_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import fedlora.adapters  # noqa: F401  (installs the filter before importing PEFT)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
            "you already `pip install kernels`",
            "No module named 'kernels'",
        )
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def test_importing_fedlora_and_peft_prints_no_hub_kernel_notice() -> None:
    code = "import fedlora.adapters, peft"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in out.stderr

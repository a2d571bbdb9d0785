"""Device placement, checked on a machine without a GPU.

Two checks stand in for a CUDA run in CI:

- **No device is named outside** :mod:`fedlora.devices`: no ``"cpu"``/``"cuda"`` literal and no
  ``.cpu()``/``.cuda()`` call in any other source file. A hard-coded device is the bug class
  behind ``MergedBase.delta()`` building on the CPU and the benchmarks loading on the CPU.
- **Nothing is created on a default device**: whole runs of every method (and client-level DP,
  and a bfloat16 merged base) with PyTorch's default device set to ``meta``. A tensor made without
  a device (``torch.zeros(n)``, ``torch.randn(shape, generator=g)``, an index ``torch.arange``)
  lands on ``meta`` and fails the first operation that mixes it with the run's real tensors, as it
  would fail on CUDA from round 2 (the noise of DP, HAFL's masks and indices).

What only a GPU run shows: tensors a file or a message brings back on the host and a method
uses beside device tensors (FedSA-LoRA's own ``B`` from its store), kernels that exist on one
device only, dtype support, memory and speed (``fedlora bench gpu``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedlora import devices
from fedlora.config import RunConfig, load_config
from fedlora.errors import ConfigError
from fedlora.experiment import run_experiment
from fedlora.methods import REGISTRY

SRC = Path(__file__).parent.parent / "src" / "fedlora"
TINY = Path(__file__).parent.parent / "configs" / "tiny.toml"
DEVICE_NAMES = {"cpu", "cuda"}


def _named_devices(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.split(":")[0]
            if value in DEVICE_NAMES:
                yield node.lineno, repr(node.value)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in DEVICE_NAMES
            and not node.args
        ):
            yield node.lineno, f".{node.func.attr}()"


NAMING_ALLOWED = {"devices.py", "doctor.py"}
"""The device module, and the report whose sections are called ``cpu`` and ``cuda``."""


def test_no_module_but_devices_names_a_device() -> None:
    found = [
        f"{path.relative_to(SRC)}:{line}: {what}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name not in NAMING_ALLOWED
        for line, what in _named_devices(ast.parse(path.read_text()))
    ]
    assert found == []


def test_the_device_scan_finds_what_it_looks_for() -> None:
    code = 'x.to("cpu"); y.cuda(); torch.device("cuda:1"); z.cpu()\nok = "cpus"'
    found = sorted(w for _, w in _named_devices(ast.parse(code)))

    assert found == sorted(["'cpu'", ".cuda()", "'cuda:1'", ".cpu()"])


@pytest.fixture
def meta_default() -> Iterator[None]:
    """PyTorch's default device is ``meta`` for the test's duration."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _quick(*overrides: str) -> RunConfig:
    return load_config(TINY, ["rounds=2", "train.steps=2", "eval.batch_size=16", *overrides])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_two_rounds_with_nothing_on_the_default_device(
    name: str, meta_default: None, tmp_path: Path
) -> None:
    ranks = [] if REGISTRY[name].traits.mixed_ranks else ["clients.ranks=[4]"]
    summary = run_experiment(_quick(f"strategy={name}", *ranks), tmp_path / "run", progress=False)

    assert summary["rounds"] == 2 and summary["device"] == "cpu"


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=flexlora", "privacy.clip_norm=1.0", "privacy.noise_multiplier=0.5"],
        ["strategy=ffa", "privacy.clip_norm=1.0", "privacy.noise_multiplier=0.5"],
        ["strategy=flora", "model.dtype=bfloat16"],  # the merged base's float32 terms
        ["strategy=flora", "save_merged=true", "model.dtype=bfloat16"],
    ],
    ids=["dp-flexlora", "dp-ffa", "flora-bfloat16", "flora-merged-export"],
)
def test_privacy_and_the_merged_base_create_nothing_on_the_default_device(
    overrides: list[str], meta_default: None, tmp_path: Path
) -> None:
    summary = run_experiment(_quick(*overrides), tmp_path / "run", progress=False)

    assert summary["rounds"] == 2


def test_a_default_device_tensor_is_caught(meta_default: None) -> None:
    """The check itself: what the round-2 bugs did (a mask made without a device, indexed with
    the state's indices; noise drawn without a device) fails under it."""
    factors = torch.ones(4, 3, device=devices.HOST)
    with pytest.raises((RuntimeError, NotImplementedError, AttributeError)):
        factors + torch.randn(4, 3, generator=torch.Generator())
    with pytest.raises((RuntimeError, NotImplementedError, AttributeError)):
        keep = torch.zeros(4, dtype=torch.bool)
        keep[torch.arange(2, device=devices.HOST)] = True
        factors[~keep].sum().item()


# --- choosing a device ------------------------------------------------------------------------


def test_a_device_that_is_not_here_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert devices.resolve_device("cpu") == devices.HOST
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == devices.HOST
    with pytest.raises(ConfigError, match="CUDA is not available"):
        devices.resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("auto").type == "cuda"
    with pytest.raises(ConfigError, match="has 1 CUDA device"):
        devices.resolve_device("cuda:1")


@pytest.mark.parametrize(
    ("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]
)
def test_cuda_bfloat16_is_native_from_ampere_on(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], native: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)

    assert devices.cuda_bf16_native(torch.device("cuda", 0)) is native


def test_peak_memory_is_reported_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)

    assert devices.peak_memory_mb(devices.HOST) is None
    assert devices.peak_memory_mb(torch.device("cuda", 0)) == 3.0

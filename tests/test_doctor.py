"""`fedlora doctor`: the report's data, its screen, and the command."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fedlora import doctor, precision
from fedlora.cli import main

KEYS = {
    "versions": {"python", "platform", *doctor.PACKAGES, "torch_cuda_build"},
    "cpu": {
        "model",
        "machine",
        "logical_cores",
        "affinity_cores",
        "torch_threads",
        "memory_gib",
        "flags",
        "native_bf16",
        "native_fp16",
    },
    "cuda": {"available", "devices"},
    "auto": {"device", "dtype", "dtype_reason", "max_length", "attention", "attention_reason"},
    "extras": {"bitsandbytes", "flower", "ray"},
    "cache": {"folder", "exists", "default_model_converted", "free_gib", "free_measured_at"},
}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return doctor.collect()


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA unavailable, and any device query an error."""

    def query(*args: object) -> None:
        raise AssertionError("a CUDA device was queried while CUDA is unavailable")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", query)
    monkeypatch.setattr(torch.cuda, "get_device_properties", query)
    monkeypatch.setattr(torch.cuda, "get_device_capability", query)


def test_collect_has_every_section_with_its_keys_and_types(report: dict[str, Any]) -> None:
    assert list(report) == list(doctor.SECTIONS)
    for section, keys in KEYS.items():
        assert set(report[section]) == keys, section
    assert all(isinstance(v, str) for k, v in report["versions"].items() if k != "torch_cuda_build")
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["torch_cuda_build"] == torch.version.cuda
    cpu = report["cpu"]
    assert isinstance(cpu["model"], str) and cpu["model"]
    assert isinstance(cpu["logical_cores"], int) and cpu["logical_cores"] >= 1
    assert cpu["torch_threads"] == torch.get_num_threads()
    assert set(cpu["flags"]) == {"avx512_bf16", "amx_bf16", "amx_fp16"}
    assert cpu["native_bf16"] is precision.cpu_has_native_bf16()
    assert cpu["native_fp16"] is precision.cpu_has_native_fp16()
    assert cpu["memory_gib"]["total"] >= cpu["memory_gib"]["available"] > 0
    assert report["cuda"]["available"] is torch.cuda.is_available()
    assert isinstance(report["cuda"]["devices"], list)
    assert report["extras"]["flower"]["usable"] is True  # flwr[simulation] is a dependency
    assert report["extras"]["ray"]["usable"] is True
    assert isinstance(report["extras"]["bitsandbytes"]["usable"], bool)
    assert isinstance(report["cache"]["free_gib"], float)
    assert isinstance(report["environment"], dict)
    json.dumps(report)  # JSON-ready throughout


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.usefixtures("hardware_auto")
def test_without_cuda_no_device_is_queried_and_auto_is_the_cpu() -> None:
    assert doctor.cuda_info() == {"available": False, "devices": []}
    auto = doctor.auto_choices()
    expected = precision.resolve_dtype("auto", torch.device("cpu"))
    assert auto["device"] == "cpu"
    assert auto["dtype"] == precision.dtype_name(expected)
    assert "bfloat16" in auto["dtype_reason"]
    assert auto["max_length"] == 128
    assert auto["attention"] == precision.resolve_attention(
        "auto", torch.device("cpu"), expected, 128
    )


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.usefixtures("hardware_auto")
def test_a_cpu_with_native_bfloat16_picks_bfloat16_and_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    # both flags set, never read from this machine: an AMX CPU must not change the reason
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    auto = doctor.auto_choices()

    assert (auto["dtype"], auto["attention"]) == ("bfloat16", "eager")
    assert auto["dtype_reason"] == "CPU with AVX512-BF16: native bfloat16"
    assert "eager is faster" in auto["attention_reason"]


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.usefixtures("hardware_auto")
@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "named"),
    [(False, True, "AMX-BF16"), (True, True, "AVX512-BF16/AMX-BF16")],
)
def test_the_bfloat16_reason_names_the_cpus_own_units(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, named: str
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    assert doctor.auto_choices()["dtype_reason"] == f"CPU with {named}: native bfloat16"


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.usefixtures("hardware_auto")
def test_a_cpu_without_native_bfloat16_says_it_would_be_emulated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)

    auto = doctor.auto_choices()

    assert (auto["dtype"], auto["attention"]) == ("float32", "sdpa")
    assert auto["dtype_reason"].startswith(
        "CPU without AVX512-BF16/AMX: bfloat16 would be emulated"
    )


@pytest.mark.usefixtures("hardware_auto")
def test_a_cuda_device_reports_capability_memory_and_bfloat16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    props = SimpleNamespace(name="H100", major=9, minor=0, total_memory=80 * doctor.GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    device = doctor.cuda_device(0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    reason = doctor.dtype_reason(torch.device("cuda"), torch.float32)

    assert device == {
        "index": 0,
        "name": "H100",
        "capability": "9.0",
        "memory_gib": 80.0,
        "native_bf16": True,
    }
    assert reason == "CUDA compute capability 7.5: no native bfloat16, so float32"


def test_render_shows_every_section_and_the_torch_version(report: dict[str, Any]) -> None:
    screen = doctor.render(report)

    for title in doctor.TITLES.values():
        assert f"== {title} ==" in screen
    assert torch.__version__ in screen
    assert report["auto"]["dtype_reason"] in screen


def test_a_missing_package_shows_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "ray":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)

    found = doctor.versions()
    screen = doctor.render({"versions": found})

    assert found["ray"] == "not installed"
    assert found["torch"] == torch.__version__
    assert any(line.split() == ["ray", "not", "installed"] for line in screen.splitlines())


def test_an_extra_that_fails_to_import_reports_the_error() -> None:
    missing = doctor.try_import("fedlora_no_such_module")

    assert missing["usable"] is False and missing["version"] is None
    assert missing["error"].startswith("ModuleNotFoundError: No module named")


def test_cache_reports_the_folder_the_converted_model_and_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "a" / "b"
    monkeypatch.setenv("FEDLORA_CACHE", str(folder))

    before = doctor.cache_info()
    (folder / "smollm2-135m-instruct").mkdir(parents=True)
    (folder / "smollm2-135m-instruct" / "config.json").write_text("{}")
    after = doctor.cache_info()

    assert before["folder"] == str(folder) and before["free_measured_at"] == str(tmp_path)
    assert (before["exists"], before["default_model_converted"]) == (False, False)
    assert (after["exists"], after["default_model_converted"]) == (True, True)
    assert after["free_measured_at"] == str(folder) and after["free_gib"] > 0


def test_environment_lists_only_the_set_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in doctor.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")

    assert doctor.environment() == {"OMP_NUM_THREADS": "3"}


def test_a_failing_section_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("disk on fire\nsecond line")

    monkeypatch.setattr(doctor, "cache_info", broken)

    report = doctor.collect()

    assert report["cache"] == {"error": "OSError: disk on fire"}
    assert "error  OSError: disk on fire" in doctor.render(report)


def test_the_command_prints_the_screen_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.json"

    code = main(["doctor", "--json", str(path)])

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("fedlora doctor")
    assert "== What auto picks ==" in out and torch.__version__ in out
    written = json.loads(path.read_text())
    assert list(written) == list(doctor.SECTIONS)
    assert written["versions"]["torch"] == torch.__version__

"""``fedlora doctor``: one screen describing this machine, for a bug report.

It reports the library versions, the CPU (and its bfloat16/float16 flags), the CUDA devices,
what ``auto`` picks for the device, the compute dtype and the attention implementation (and
why), which optional extras import, the model cache, and the environment variables that change
fedlora's behaviour. :func:`collect` gathers it as plain JSON-ready data, :func:`render` turns
that into text; nothing here loads a model or touches a CUDA device when CUDA is unavailable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedlora import devices, models, precision

NOT_INSTALLED = "not installed"

PACKAGES = (
    "fedlora",
    "torch",
    "transformers",
    "peft",
    "flwr",
    "ray",
    "bitsandbytes",
    "datasets",
    "flwr-datasets",
    "safetensors",
)
"""Distributions whose versions the report lists (read from their metadata, never imported)."""

ENVIRONMENT = (
    "FEDLORA_CACHE",
    "FEDLORA_AUTO_DTYPE",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "HF_HOME",
)
"""Environment variables that change what fedlora does; the report lists the set ones."""

EXTRAS = {"bitsandbytes": "bitsandbytes", "flower": "flwr", "ray": "ray"}
"""Optional capabilities → the module whose import says whether they are usable."""

CPU_FLAGS = {
    "avx512_bf16": "_is_avx512_bf16_supported",
    "amx_bf16": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}
"""CPU flag → the ``torch.cpu`` probe that reports it."""

DEFAULT_MODEL_FOLDER = "smollm2-135m-instruct"
"""The embedded default model's folder under the cache, once converted."""

GIB = 1024**3

SECTIONS = ("versions", "cpu", "cuda", "auto", "extras", "cache", "environment")
"""The report's sections, in the order :func:`render` prints them."""

TITLES = {
    "versions": "Versions",
    "cpu": "CPU",
    "cuda": "CUDA",
    "auto": "What auto picks",
    "extras": "Extras",
    "cache": "Cache",
    "environment": "Environment",
}


def collect() -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data keyed by :data:`SECTIONS`. A section
    that fails to gather holds ``{"error": ...}`` instead of stopping the report."""
    gatherers: dict[str, Callable[[], dict[str, Any]]] = {
        "versions": versions,
        "cpu": cpu_info,
        "cuda": cuda_info,
        "auto": auto_choices,
        "extras": extras,
        "cache": cache_info,
        "environment": environment,
    }
    return {name: _guarded(gather) for name, gather in gatherers.items()}


def _guarded(gather: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return gather()
    except Exception as exc:  # a doctor reports what is broken rather than breaking
        return {"error": _first_line(exc)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- versions -------------------------------------------------------------------------------


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or :data:`NOT_INSTALLED`."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def versions() -> dict[str, Any]:
    """Python, the platform, every package of :data:`PACKAGES`, and torch's CUDA build (None
    on a CPU-only build)."""
    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        found[name] = package_version(name)
    found["torch_cuda_build"] = torch.version.cuda
    return found


# -- CPU ------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` where there is one, else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flag(probe: str) -> bool | None:
    """A ``torch.cpu`` probe's answer, None where this torch lacks or cannot run it."""
    try:
        return bool(getattr(torch.cpu, probe)())
    except (AttributeError, RuntimeError):
        return None


def memory_gib() -> dict[str, float | None]:
    """Total and available memory in GiB (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return {"total": None, "available": None}
    mem = psutil.virtual_memory()
    return {"total": round(mem.total / GIB, 1), "available": round(mem.available / GIB, 1)}


def cpu_info() -> dict[str, Any]:
    """Model, cores, torch threads, memory, and the bfloat16/float16 hardware flags."""
    flags = {name: cpu_flag(probe) for name, probe in CPU_FLAGS.items()}
    return {
        "model": cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "affinity_cores": devices.affinity_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib(),
        "flags": flags,
        "native_bf16": precision.cpu_has_native_bf16(),
        "native_fp16": precision.cpu_has_native_fp16(),
    }


# -- CUDA -----------------------------------------------------------------------------------


def cuda_device(index: int) -> dict[str, Any]:
    """Name, compute capability, memory and native bfloat16 of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / GIB, 1),
        "native_bf16": devices.cuda_bf16_native(torch.device("cuda", index)),
    }


def cuda_info() -> dict[str, Any]:
    """Whether CUDA is available and, only if it is, each device."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    return {"available": available, "devices": [cuda_device(i) for i in range(count)]}


# -- what auto picks ------------------------------------------------------------------------


def default_max_length() -> int:
    """The default ``model.max_length`` (which ``auto`` attention depends on)."""
    from fedlora.config import ModelConfig

    return ModelConfig().max_length


def dtype_reason(device: torch.device, dtype: torch.dtype) -> str:
    """One line saying why ``auto`` gave ``dtype`` on ``device``."""
    name = precision.dtype_name(dtype)
    forced = os.environ.get(precision.AUTO_DTYPE_VARIABLE)
    if forced:
        return f"{precision.AUTO_DTYPE_VARIABLE}={forced} overrides the hardware's choice"
    if devices.is_cuda(device):
        major, minor = torch.cuda.get_device_capability(device)
        native = "native bfloat16" if dtype == torch.bfloat16 else "no native bfloat16"
        return f"CUDA compute capability {major}.{minor}: {native}, so {name}"
    if devices.is_cpu(device) and dtype == torch.bfloat16:
        return f"CPU with {_bf16_hardware()}: native bfloat16"
    if devices.is_cpu(device):
        return f"CPU without AVX512-BF16/AMX: bfloat16 would be emulated, so {name}"
    return f"device {device.type}: {name}"


def _bf16_hardware() -> str:
    names = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
    present = [label for flag, label in names.items() if cpu_flag(CPU_FLAGS[flag])]
    return "/".join(present) or "ARM BF16"


def attention_reason(device: torch.device, dtype: torch.dtype, attention: str, length: int) -> str:
    """One line saying why ``auto`` gave ``attention`` for ``length`` tokens."""
    name = precision.dtype_name(dtype)
    if attention == "eager":
        return f"CPU in {name}, max_length {length}: eager is faster than the fused kernel"
    if devices.is_cpu(device) and dtype in (torch.bfloat16, torch.float16):
        return f"CPU in {name}, max_length {length}: long enough for the fused kernel to win"
    if devices.is_cpu(device):
        return f"CPU in {name}: the fused kernel is faster at every length"
    return f"{device.type}: the fused kernel"


def auto_choices() -> dict[str, Any]:
    """The device, compute dtype and attention implementation ``auto`` resolves to, each with
    the reason."""
    device = models.resolve_device("auto")
    dtype = precision.resolve_dtype("auto", device)
    length = default_max_length()
    attention = precision.resolve_attention("auto", device, dtype, length)
    return {
        "device": str(device),
        "dtype": precision.dtype_name(dtype),
        "dtype_reason": dtype_reason(device, dtype),
        "max_length": length,
        "attention": attention,
        "attention_reason": attention_reason(device, dtype, attention, length),
    }


# -- extras ---------------------------------------------------------------------------------


def try_import(module: str) -> dict[str, Any]:
    """Whether ``module`` imports (its own chatter kept off the screen), its version, and the
    error's first line if it does not."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), _silenced(sink):
            warnings.simplefilter("ignore")
            imported = importlib.import_module(module)
    except Exception as exc:
        return {"usable": False, "version": None, "error": _first_line(exc), "note": None}
    version = getattr(imported, "__version__", None)
    return {
        "usable": True,
        "version": str(version) if version else None,
        "error": None,
        "note": None,
    }


@contextlib.contextmanager
def _silenced(sink: io.StringIO) -> Iterator[None]:
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def extras() -> dict[str, Any]:
    """bitsandbytes (quantized clients), Flower and Ray (the Flower engine and its simulation):
    whether each imports, with a note for bitsandbytes on a CPU-only torch."""
    found = {name: try_import(module) for name, module in EXTRAS.items()}
    bnb = found["bitsandbytes"]
    if bnb["usable"] and torch.version.cuda is None:
        bnb["note"] = (
            "CPU-only torch: quantized clients need a CUDA device or bitsandbytes' CPU backend"
        )
    return found


# -- cache ----------------------------------------------------------------------------------


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def cache_info() -> dict[str, Any]:
    """The cache folder, whether it and the converted default model exist, and free disk."""
    folder = models.cache_dir()
    existing = nearest_existing(folder)
    return {
        "folder": str(folder),
        "exists": folder.is_dir(),
        "default_model_converted": (folder / DEFAULT_MODEL_FOLDER / "config.json").is_file(),
        "free_gib": round(shutil.disk_usage(existing).free / GIB, 1),
        "free_measured_at": str(existing),
    }


# -- environment ----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """The variables of :data:`ENVIRONMENT` that are set, with their values."""
    return {name: os.environ[name] for name in ENVIRONMENT if name in os.environ}


# -- the screen -----------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The report as text: one heading per section, one ``key: value`` line per entry."""
    lines = ["fedlora doctor (paste this into a bug report)"]
    for name in SECTIONS:
        lines += ["", f"== {TITLES[name]} =="]
        lines += _rows(report.get(name, {}))
    return "\n".join(lines) + "\n"


def _rows(section: dict[str, Any]) -> list[str]:
    if not section:
        return ["  (none)"]
    width = max(len(key) for key in section)
    return [line for key, value in section.items() for line in _row(key, value, width)]


def _row(key: str, value: Any, width: int) -> list[str]:
    if isinstance(value, list):
        return [f"  {key:<{width}}  {_flat(item)}" for item in value] or [f"  {key:<{width}}  none"]
    return [f"  {key:<{width}}  {_flat(value)}"]


def _flat(value: Any) -> str:
    """A value on one line: nested mappings as ``key=value`` pairs (unset ones left out), None
    as ``none``."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_flat(v)}" for k, v in value.items() if v is not None) or "none"
    if value is None:
        return "none"
    return str(value)

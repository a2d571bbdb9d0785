"""Where tensors live: the one module that names a device.

Every other module takes its device from a tensor or a model it was given (``like.device``,
``.to(like)``, ``like.new_zeros``), or from :func:`resolve_device`. Two places are fixed by what
they do, and named here so no other module spells them out:

- :data:`HOST`, the CPU: where files and Flower messages are read and written (safetensors and
  NumPy hold host memory), where seeded generators draw (a CPU ``torch.Generator`` gives the same
  numbers on every machine, and the draw is moved to where it is used), and where per-example
  scores are gathered into Python numbers.
- the accelerator, when one is chosen: CUDA's bfloat16 support, peak memory, determinism.

``tests/test_devices.py`` keeps this so: no ``"cpu"``/``"cuda"`` literal and no ``.cpu()`` or
``.cuda()`` call outside this module, and every strategy, the privacy noise and the merged base
run two rounds with PyTorch's default device set to ``meta``, where a tensor created without a
device shows up on the wrong device and fails the first operation that mixes it with its inputs.
"""

from __future__ import annotations

import os

import torch

from fedlora.errors import ConfigError

HOST = torch.device("cpu")
"""The host: files, messages, seeded draws and gathered scores (module docstring)."""


def resolve_device(device: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU; otherwise the named
    device (``cpu``, ``cuda``, ``cuda:N``), refused with the reason when it is not here."""
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else HOST
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from exc
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def is_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached on :data:`HOST` (a copy only when it lives elsewhere)."""
    return t.detach().to(HOST)


def affinity_cores() -> int | None:
    """The cores this process may run on (``sched_getaffinity``), None where unsupported."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    return None if getaffinity is None else len(getaffinity(0))


def host_generator(seed: int) -> torch.Generator:
    """A seeded generator on :data:`HOST`: the same draws on every machine. Draw with
    ``device=HOST`` and move the result to where it is used."""
    return torch.Generator(device=HOST).manual_seed(seed)


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether CUDA ``device`` multiplies bfloat16 in hardware: compute capability 8.0 or newer
    (Ampere, Hopper, Blackwell). ``torch.cuda.is_bf16_supported()`` also counts emulation
    (V100, T4), where bfloat16 runs slower than float32."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (for timings); nothing to wait for on the CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA ``device`` (nothing elsewhere)."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory PyTorch's allocator held on CUDA ``device`` since the last
    :func:`reset_peak_memory`, in MiB; None on other devices (no allocator statistics)."""
    if not is_cuda(device):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def allocated_mb(device: torch.device) -> float | None:
    """The memory PyTorch's allocator holds on CUDA ``device`` now, in MiB; None elsewhere."""
    if not is_cuda(device):
        return None
    return torch.cuda.memory_allocated(device) / 2**20


def total_memory_bytes(device: torch.device) -> int:
    """The memory ``device`` has in all: a CUDA device's own; for the CPU the host's physical
    memory, or its control group's limit (``/sys/fs/cgroup/memory.max``) where lower."""
    if is_cuda(device):
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def set_deterministic(enabled: bool) -> None:
    """Make CUDA kernels deterministic (``model.deterministic``): PyTorch's deterministic
    algorithms (an error where an operation has none, rather than a silent difference), cuBLAS's
    fixed workspace, cuDNN without benchmarking. On the CPU fedlora's kernels are already
    deterministic for a fixed thread count, so this changes nothing there."""
    if not enabled:
        return
    # cuBLAS needs this before its first handle is made to reduce in a fixed order
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives, with its index (``cuda:0``, not ``cuda``): the
    device a client reports it trained on."""
    return next(model.parameters()).device


def cuda_count() -> int:
    """How many CUDA devices this process sees: 0 without CUDA (or where Ray hid them from a
    Flower ClientApp given no GPU)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def names_host(device: str) -> bool:
    """Whether the device setting ``device`` (``auto``, ``cpu``, ``cuda[:N]``) names the CPU."""
    return device.split(":")[0] == HOST.type


def round_robin(count: int, gpus: int) -> list[str]:
    """Device names for ``count`` processes on one host with ``gpus`` CUDA devices:
    ``cuda:0``, ``cuda:1``, …, ``cuda:{gpus-1}``, ``cuda:0``, …; every one the CPU when
    ``gpus`` is 0."""
    if gpus <= 0:
        return [HOST.type] * count
    return [f"cuda:{k % gpus}" for k in range(count)]

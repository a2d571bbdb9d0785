"""Plans and results as Flower records, and back: tensors as ``ArrayRecord`` (NumPy ``.npy``
bytes, loaded with ``allow_pickle=False``), scalars as ``ConfigRecord``. Nothing is pickled.

A plan travels as ``plan`` (rank, round, flags), ``start`` / ``frozen`` (factors, ``{module}.A``
and ``{module}.B``) and one ``base.{i}`` record per merged base update the node has not received
(``{module}.A``/``.B`` when factored, ``{module}.W`` when dense). A result travels as ``result``
(loss and examples, neither from a private client; the device it was trained on), ``factors``,
``kept`` and, for HAFL, ``importance``. Flower splits arrays into
chunks itself, so adapter size is not bounded by one message frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.clients.base import Scalar
from fedlora.devices import to_host
from fedlora.errors import UpdateError
from fedlora.lora import BaseDelta, Expected, LoRAFactors
from fedlora.rounds import LocalPlan, LocalResult, Task


def _array(t: torch.Tensor) -> Array:
    return Array(to_host(t).contiguous().numpy())


def _tensor(record: ArrayRecord, key: str, where: str) -> torch.Tensor:
    try:
        array = record[key]
    except KeyError:
        raise UpdateError(f"{where}: missing array {key!r}") from None
    try:
        value = array.numpy()
    except (ValueError, TypeError) as exc:  # e.g. a pickled object array: never loaded
        raise UpdateError(f"{where}: array {key!r} is not a plain NumPy array ({exc})") from None
    if value.dtype.kind != "f":
        raise UpdateError(f"{where}: array {key!r} has dtype {value.dtype}, expected float")
    return torch.from_numpy(np.array(value, copy=True))


def factors_record(factors: Mapping[str, BaseDelta]) -> ArrayRecord:
    """Factors (or dense deltas) per module as one record."""
    record = ArrayRecord()
    for name, f in factors.items():
        if isinstance(f, LoRAFactors):
            record[f"{name}.A"] = _array(f.A)
            record[f"{name}.B"] = _array(f.B)
        else:
            record[f"{name}.W"] = _array(f)
    return record


def record_factors(record: ArrayRecord, where: str) -> dict[str, LoRAFactors]:
    """The inverse of :func:`factors_record` for factors; ``where`` names the sender in errors."""
    out = {}
    for name, delta in record_deltas(record, where).items():
        if not isinstance(delta, LoRAFactors):
            raise UpdateError(f"{where}: module {name!r} is dense, expected factors A and B")
        out[name] = delta
    return out


def record_deltas(record: ArrayRecord, where: str) -> dict[str, BaseDelta]:
    """Factors or dense deltas per module from a record made by :func:`factors_record`."""
    names: dict[str, set[str]] = {}
    for key in record:
        name, _, part = key.rpartition(".")
        if part not in ("A", "B", "W") or not name:
            raise UpdateError(f"{where}: unexpected array {key!r} (expected MODULE.A/.B/.W)")
        names.setdefault(name, set()).add(part)
    out: dict[str, BaseDelta] = {}
    for name, parts in names.items():
        if parts == {"W"}:
            out[name] = _tensor(record, f"{name}.W", where)
            continue
        if parts != {"A", "B"}:
            raise UpdateError(f"{where}: module {name!r} has arrays {sorted(parts)}, need A and B")
        try:
            out[name] = LoRAFactors(
                A=_tensor(record, f"{name}.A", where), B=_tensor(record, f"{name}.B", where)
            )
        except ValueError as exc:
            raise UpdateError(f"{where}: module {name!r}: {exc}") from None
    return out


def task_content(task: Task) -> RecordDict:
    """A task as the content of a ``train`` message."""
    plan = task.plan
    content = RecordDict(
        {
            "plan": ConfigRecord(
                {
                    "client": task.client.cid,
                    "index": task.client.index,
                    "alpha": float(task.client.alpha),
                    "round": task.round,
                    "rank": plan.rank,
                    "base_from": task.base_from,
                    "base_count": len(task.base_deltas),
                }
            ),
            "options": ConfigRecord(dict(plan.options)),
        }
    )
    if plan.start:
        content["start"] = factors_record(plan.start)
    if plan.frozen:
        content["frozen"] = factors_record(plan.frozen)
    for i, delta in enumerate(task.base_deltas):
        content[f"base.{task.base_from + i}"] = factors_record(delta)
    return content


def content_plan(content: RecordDict) -> tuple[LocalPlan, int, dict[int, dict[str, BaseDelta]]]:
    """A ``train`` message's plan, round and merged base updates (by their position)."""
    where = "train message"
    p = config_part(content, "plan", where)
    start = frozen = None
    if "start" in content:
        start = record_factors(array_part(content, "start", where), where)
    if "frozen" in content:
        frozen = record_factors(array_part(content, "frozen", where), where)
    plan = LocalPlan(
        rank=int(_scalar(p, "rank", where)),
        start=start,
        frozen=frozen,
        options=plan_options(config_part(content, "options", where), where),
    )
    first = int(_scalar(p, "base_from", where))
    count = int(_scalar(p, "base_count", where))
    base = {}
    for i in range(first, first + count):
        key = f"base.{i}"
        base[i] = record_deltas(array_part(content, key, where), f"{where} ({key})")
    return plan, int(_scalar(p, "round", where)), base


def plan_options(record: ConfigRecord, where: str) -> dict[str, Scalar]:
    """A plan's options: each a bool, int, float or str."""
    options: dict[str, Scalar] = {}
    for key in record:
        value = record[key]
        if not isinstance(value, (bool, int, float, str)):
            raise UpdateError(f"{where}: plan option {key!r} must be a scalar, got {value!r}")
        options[key] = value
    return options


def result_content(
    result: LocalResult, device: str | None = None, peak_memory_mb: float | None = None
) -> RecordDict:
    """A client's result as the content of its reply, with the ``device`` it trained on and the
    peak memory its training took there (MiB; CUDA only); a loss, example count or peak that is
    None (a private client's, :func:`fedlora.privacy.withholds`) is not sent."""
    summary = ConfigRecord({"next_rank": -1 if result.next_rank is None else int(result.next_rank)})
    if result.loss is not None:
        summary["loss"] = float(result.loss)
    if result.num_examples is not None:
        summary["num_examples"] = int(result.num_examples)
    if device is not None:
        summary["device"] = device
    if peak_memory_mb is not None:
        summary["peak_memory_mb"] = float(peak_memory_mb)
    content = RecordDict(
        {
            "result": summary,
            "factors": factors_record(result.factors),
            "kept": ConfigRecord({name: int(k) for name, k in result.kept.items()}),
        }
    )
    if result.importance is not None:
        content["importance"] = ArrayRecord(
            {name: _array(score) for name, score in result.importance.items()}
        )
    return content


def content_result(
    content: RecordDict, client: str, expected: Expected | None = None
) -> LocalResult:
    """A reply's result; a malformed reply raises :class:`UpdateError` naming ``client``. With
    ``expected`` (the model's modules and the rank the client was asked to train), every array's
    key, declared shape, dtype and size are checked before any is decoded
    (:func:`check_arrays`), so a reply cannot make the server allocate more than an honest one
    would."""
    where = f"reply of client {client!r}"
    r = config_part(content, "result", where)
    factors_rec = array_part(content, "factors", where)
    if expected is not None:
        check_arrays(factors_rec, expected, where)
    factors = record_factors(factors_rec, where)
    importance = None
    if "importance" in content:
        rec = array_part(content, "importance", where)
        if expected is not None:
            check_arrays(rec, expected, where, importance=True)
        importance = {name: _tensor(rec, name, where) for name in rec}
    kept_rec = config_part(content, "kept", where)
    kept = {name: _int(kept_rec, name, where, f"kept[{name!r}]", 0) for name in kept_rec}
    # a private client sends neither its example count nor its loss (both optional)
    examples = _int(r, "num_examples", where, "num_examples", 1) if "num_examples" in r else None
    next_rank = _int(r, "next_rank", where, "next_rank", -1)
    if next_rank == 0:
        raise UpdateError(f"{where}: next_rank must be an int >= 1 (or -1: unchanged), got 0")
    loss = r.get("loss")
    if loss is not None and (
        isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)
    ):
        raise UpdateError(f"{where}: loss must be a finite number, got {loss!r}")
    return LocalResult(
        factors,
        None if loss is None else float(loss),
        importance,
        kept,
        examples,
        None if next_rank < 0 else next_rank,
    )


def _int(record: ConfigRecord, key: str, where: str, label: str, low: int) -> int:
    """``record[key]`` as an int ``>= low``, or an :class:`UpdateError` saying what it was."""
    value = _scalar(record, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UpdateError(f"{where}: {label} must be an int >= {low}, got {value!r}")
    return value


def positive_alpha(value: object, where: str) -> float:
    """A LoRA ``α`` as a record carries it (a node's identity, a train message's plan): a number
    ``> 0``, or an :class:`UpdateError` saying what it was."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UpdateError(f"{where}: alpha must be a number > 0, got {value!r}")
    return float(value)


NPY_HEADER_BYTES = 4096
"""Room for a ``.npy`` header beside an array's data (NumPy writes 128 bytes, or a multiple)."""


def check_arrays(
    record: ArrayRecord, expected: Expected, where: str, importance: bool = False
) -> None:
    """Before anything is decoded: every array is a factor of one of the model's modules
    (``MODULE.A`` of shape ``(r, d_in)``, ``MODULE.B`` of ``(d_out, r)``, ``r`` at most the rank
    asked; or, for ``importance``, ``MODULE`` of shape ``(r,)``), of ``expected.dtype`` (scores:
    any float), and its bytes are no more than that shape needs."""
    dtype = str(expected.dtype).removeprefix("torch.")
    for key in record:
        array = record[key]
        name, part = (key, "") if importance else key.rpartition(".")[::2]
        if name not in expected.shapes or part not in (("",) if importance else ("A", "B")):
            raise UpdateError(f"{where}: unexpected array {key!r} (not a module of the model)")
        d_out, d_in = expected.shapes[name]
        shape = tuple(array.shape)
        if importance:
            fits = len(shape) == 1 and 1 <= shape[0] <= expected.rank
        elif part == "A":
            fits = len(shape) == 2 and 1 <= shape[0] <= expected.rank and shape[1] == d_in
        else:
            fits = len(shape) == 2 and shape[0] == d_out and 1 <= shape[1] <= expected.rank
        if not fits:
            raise UpdateError(
                f"{where}: array {key!r} declares shape {shape}, which does not fit module "
                f"{name!r} ({d_out} × {d_in}) at rank <= {expected.rank}"
            )
        allowed = ("float32", "float64") if importance else (dtype,)
        if array.dtype not in allowed:
            raise UpdateError(
                f"{where}: array {key!r} has dtype {array.dtype}, expected {' or '.join(allowed)}"
            )
        need = math.prod(shape) * np.dtype(array.dtype).itemsize + NPY_HEADER_BYTES
        if len(array.data) > need:
            raise UpdateError(
                f"{where}: array {key!r} carries {len(array.data)} bytes, more than its shape "
                f"{shape} needs"
            )


def content_device(content: RecordDict, client: str) -> str | None:
    """The device a reply says its client trained on (None: it does not say)."""
    where = f"reply of client {client!r}"
    record = config_part(content, "result", where)
    if "device" not in record:
        return None
    device = record["device"]
    if not isinstance(device, str):
        raise UpdateError(f"{where}: device must be a string, got {device!r}")
    return device


def content_peak_memory(content: RecordDict, client: str) -> float | None:
    """The peak device memory (MiB) a reply says its client's training took (None: it does not
    say: a node off CUDA, a private one or an older one)."""
    where = f"reply of client {client!r}"
    record = config_part(content, "result", where)
    if "peak_memory_mb" not in record:
        return None
    peak = record["peak_memory_mb"]
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not 0 <= peak < math.inf:
        raise UpdateError(f"{where}: peak_memory_mb must be a number >= 0, got {peak!r}")
    return float(peak)


def config_part(content: RecordDict, key: str, where: str) -> ConfigRecord:
    """The ``ConfigRecord`` ``key`` of ``content``, or an error naming ``where``."""
    if key not in content.config_records:
        raise UpdateError(f"{where}: no config record {key!r}")
    return content.config_records[key]


def array_part(content: RecordDict, key: str, where: str) -> ArrayRecord:
    """The ``ArrayRecord`` ``key`` of ``content``, or an error naming ``where``."""
    if key not in content.array_records:
        raise UpdateError(f"{where}: no array record {key!r}")
    return content.array_records[key]


def _scalar(record: ConfigRecord, key: str, where: str) -> Any:
    try:
        return record[key]
    except KeyError:
        raise UpdateError(f"{where}: missing value {key!r}") from None

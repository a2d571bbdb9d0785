"""Plans and results as Flower records: exact round trips, clear errors, no pickle, chunking."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples, random_factors
from fedlora.errors import UpdateError
from fedlora.flower.records import (
    content_plan,
    content_result,
    factors_record,
    record_factors,
    result_content,
    task_content,
)
from fedlora.lora import Expected, LoRAFactors
from fedlora.rounds import ClientInfo, LocalPlan, LocalResult, Task


def _factors(
    rank: int, seed: int, shapes: dict[str, tuple[int, int]] | None = None
) -> dict[str, LoRAFactors]:
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"layers.0.q_proj": (12, 10), "layers.0.v_proj": (6, 10)}
    return {n: random_factors(o, i, rank, gen) for n, (o, i) in shapes.items()}


def _same(a: dict[str, LoRAFactors], b: dict[str, LoRAFactors]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)


def _task(start_rank: int = 4) -> Task:
    dense = torch.randn(12, 10, generator=torch.Generator().manual_seed(9))
    plan = LocalPlan(
        rank=start_rank,
        start=_factors(start_rank, 1),
        frozen=_factors(2, 2),
        options={"train": "B", "gamma": 0.9, "steps": 3, "on": True},
    )
    base = [
        _factors(3, 3),
        {"layers.0.q_proj": dense, "layers.0.v_proj": _factors(1, 4)["layers.0.v_proj"]},
    ]
    return Task(ClientInfo("client-0002", 2, start_rank, 8.0), 5, plan, 3, base, 123)


def test_a_task_round_trips_bitwise() -> None:
    task = _task()
    plan, t, base = content_plan(task_content(task))
    assert t == 5 and plan.rank == 4
    assert plan.options == {"train": "B", "gamma": 0.9, "steps": 3, "on": True}
    assert [type(v) for v in plan.options.values()] == [str, float, int, bool]
    assert plan.start is not None and task.plan.start is not None
    assert plan.frozen is not None and task.plan.frozen is not None
    _same(plan.start, task.plan.start)
    _same(plan.frozen, task.plan.frozen)
    assert sorted(base) == [3, 4]  # numbered by position among all merged updates
    assert torch.equal(base[4]["layers.0.q_proj"], task.base_deltas[1]["layers.0.q_proj"])  # type: ignore[arg-type]
    got_v = base[4]["layers.0.v_proj"]
    assert isinstance(got_v, LoRAFactors) and torch.equal(
        got_v.B, task.base_deltas[1]["layers.0.v_proj"].B
    )  # type: ignore[union-attr]


def test_a_plan_without_start_or_pruning_stays_so() -> None:
    task = Task(ClientInfo("client-0000", 0, 8, 16.0), 1, LocalPlan(8), 0, [], 0)
    plan, _, base = content_plan(task_content(task))
    assert plan == LocalPlan(8) and base == {}


def test_a_result_round_trips_bitwise() -> None:
    factors = _factors(3, 5)
    importance = {n: torch.rand(3) for n in factors}
    result = LocalResult(factors, 1.25, importance, {n: 3 for n in factors}, 17)
    got = content_result(result_content(result), "client-0001")
    _same(got.factors, factors)
    assert got.loss == 1.25 and got.num_examples == 17 and got.kept == result.kept
    assert got.importance is not None
    assert all(torch.equal(got.importance[n], importance[n]) for n in factors)
    no_scores = content_result(result_content(LocalResult(factors, 0.5, None, {}, 3)), "c")
    assert no_scores.importance is None


def test_a_private_clients_reply_carries_no_loss_and_no_count() -> None:
    content = result_content(LocalResult(_factors(3, 5), None, None, {}, None))
    assert set(content.config_records["result"]) == {"next_rank"}
    got = content_result(content, "client-0001")
    assert got.loss is None and got.num_examples is None


def test_malformed_replies_name_the_client_and_what_is_wrong() -> None:
    good = result_content(LocalResult(_factors(2, 0), 1.0, None, {}, 4))
    missing = RecordDict({"factors": good.array_records["factors"], "kept": ConfigRecord({})})
    with pytest.raises(UpdateError, match=r"client-0007.*'result'"):
        content_result(missing, "client-0007")
    half = ArrayRecord({"m.A": Array(np.zeros((2, 3), dtype=np.float32))})
    with pytest.raises(UpdateError, match=r"module 'm' has arrays \['A'\], need A and B"):
        record_factors(half, "reply of client 'c'")
    ints = ArrayRecord(
        {
            "m.A": Array(np.zeros((2, 3), dtype=np.int64)),
            "m.B": Array(np.zeros((4, 2), dtype=np.float32)),
        }
    )
    with pytest.raises(UpdateError, match=r"'m.A' has dtype int64, expected float"):
        record_factors(ints, "x")
    bad_shape = ArrayRecord(
        {
            "m.A": Array(np.zeros((2, 3), dtype=np.float32)),
            "m.B": Array(np.zeros((4, 5), dtype=np.float32)),
        }
    )
    with pytest.raises(UpdateError, match=r"module 'm': rank mismatch"):
        record_factors(bad_shape, "x")
    stray = ArrayRecord({"weights": Array(np.zeros(2, dtype=np.float32))})
    with pytest.raises(UpdateError, match=r"unexpected array 'weights'"):
        record_factors(stray, "x")
    text = RecordDict(
        {
            "result": ConfigRecord({"loss": 1.0, "num_examples": "4"}),
            **{k: v for k, v in good.items() if k != "result"},
        }
    )
    with pytest.raises(UpdateError, match="num_examples must be an int"):
        content_result(text, "c")


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled!",))


def test_a_pickled_payload_is_refused_never_loaded(capsys: pytest.CaptureFixture[str]) -> None:
    payload = np.array([_Boom()], dtype=object)
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    assert b"unpickled!" in buffer.getvalue()  # a pickle that prints when it is loaded
    evil = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    record = ArrayRecord({"m.A": evil, "m.B": Array(np.zeros((4, 1), dtype=np.float32))})
    with pytest.raises(UpdateError, match="not a plain NumPy array"):
        record_factors(record, "reply of client 'c'")
    assert "unpickled!" not in capsys.readouterr().out  # refused before anything ran


def test_large_adapters_travel_in_chunks_and_arrive_intact() -> None:
    big = _factors(512, 7, {"layers.0.mlp.down_proj": (4096, 2048)})  # B: 8 MiB, A: 4 MiB
    record = factors_record(big)
    objects = get_all_nested_objects(RecordDict({"factors": record}))
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    chunks = [o for o in objects.values() if type(o).__name__ == "ArrayChunk"]
    assert len(chunks) >= 3 and max(len(c.deflate()) for c in chunks) <= 5 * 2**20 + 1024
    root = list(objects)[-1]
    back = inflate_object_from_contents(root, contents)
    assert isinstance(back, RecordDict)
    _same(record_factors(back.array_records["factors"], "x"), big)


SCALARS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.booleans(),
    st.binary(max_size=4),
    st.lists(st.integers(-5, 5), max_size=3),
)


@settings(max_examples=examples(200), deadline=None)
@given(
    part=st.sampled_from(["result", "kept"]),
    key=st.sampled_from(["loss", "num_examples", "next_rank", "layers.0.q_proj", "stray"]),
    value=st.one_of(st.none(), SCALARS),
)
def test_any_malformed_reply_value_is_an_update_error_never_a_crash(
    part: str, key: str, value: object
) -> None:
    result = LocalResult(_factors(4, 0), 1.5, None, {"layers.0.q_proj": 4}, 20, None)
    content = result_content(result)
    record = dict(content.config_records[part])
    if value is None:
        record.pop(key, None)  # a missing key
    else:
        record[key] = value  # type: ignore[assignment]
    content[part] = ConfigRecord(record)  # type: ignore[arg-type]

    try:
        parsed = content_result(content, "client-0007")
    except UpdateError as exc:
        assert "client 'client-0007'" in str(exc)
        return
    # a missing count or loss is a private client's (None); a present one is valid
    assert parsed.num_examples is None or parsed.num_examples >= 1
    assert parsed.loss is None or math.isfinite(parsed.loss)
    assert all(isinstance(k, int) and k >= 0 for k in parsed.kept.values())


def test_arrays_are_checked_against_the_model_before_any_is_decoded() -> None:
    shapes = {"layers.0.q_proj": (12, 10), "layers.0.v_proj": (6, 10)}
    expected = Expected(shapes, rank=4)
    good = result_content(LocalResult(_factors(4, 0), 1.0, None, {}, 5))
    assert content_result(good, "c", expected).num_examples == 5
    narrow = Expected(shapes, rank=2)  # asked for rank 2, sent rank 4
    with pytest.raises(UpdateError, match=r"declares shape \(4, 10\), which does not fit"):
        content_result(good, "c", narrow)

    def replaced(key: str, array: Array) -> RecordDict:
        content = result_content(LocalResult(_factors(4, 0), 1.0, None, {}, 5))
        record = content.array_records["factors"]
        record[key] = array
        return content

    huge = Array(dtype="float32", shape=(4, 10), stype="numpy.ndarray", data=b"\0" * 10_000_000)
    cases = [
        ("layers.0.k_proj.A", Array(np.zeros((4, 10), np.float32)), "unexpected array"),
        ("layers.0.q_proj.A", Array(np.zeros((4, 10**6), np.float32)), "declares shape"),
        ("layers.0.q_proj.A", Array(np.zeros((4, 10), np.float64)), "dtype float64"),
        ("layers.0.q_proj.A", huge, "carries 10000000 bytes"),
    ]
    for key, array, message in cases:
        with pytest.raises(UpdateError, match=message):
            content_result(replaced(key, array), "client-0003", expected)

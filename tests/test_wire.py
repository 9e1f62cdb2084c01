"""Wire format: round trips, copies on decode, and garbage that must map to InvalidRequest."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.contract import keys, wire
from common.contract.errors import BadTensor, ErrorCode, InvalidRequest, Overloaded, error_for_code

DTYPES = ["float32", "float16", "float64", "int64", "int32", "uint8"]

arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, max_side=5))
)
names = st.text(min_size=1, max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(arr=arrays, req_id=names, client=names, model=names, cut=st.integers(-5, 500),
       budget=st.none() | finite, slo=st.none() | finite)
@settings(max_examples=150, deadline=None)
def test_request_round_trip(arr, req_id, client, model, cut, budget, slo) -> None:
    req = wire.Request(req_id=req_id, client=client, model=model, cut=cut, tensor=arr, budget_ms=budget, slo_ms=slo)
    back = wire.decode_request(wire.encode_request(req))
    assert (back.req_id, back.client, back.model, back.cut) == (req_id, client, model, cut)
    assert back.budget_ms == budget and back.slo_ms == slo
    assert back.tensor is not None and back.tensor.dtype == arr.dtype and back.tensor.shape == arr.shape
    np.testing.assert_array_equal(back.tensor, arr)


@given(arr=arrays, ok=st.booleans(), code=st.sampled_from(list(ErrorCode)), msg=st.text(max_size=50))
@settings(max_examples=100, deadline=None)
def test_reply_round_trip(arr, ok, code, msg) -> None:
    rep = (wire.Reply.result("r", arr, server_ms=1.5, epoch=2, group="g", batch=3,
                             timings={"queue_ms": 0.5, "compute_ms": 1.0}) if ok
           else wire.Reply(req_id="r", ok=False, error=wire.ErrorInfo(str(code), msg, {"k": 1})))
    back = wire.decode_reply(wire.encode_reply(rep))
    assert back.ok == ok
    if ok:
        np.testing.assert_array_equal(back.tensor, arr)
        assert (back.server_ms, back.epoch, back.group, back.batch) == (1.5, 2, "g", 3)
        assert back.timings == {"queue_ms": 0.5, "compute_ms": 1.0}
    else:
        assert back.error is not None and back.error.code == code and back.error.message == msg
        assert back.error.details == {"k": 1}


def test_decoded_tensor_is_a_writable_copy() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = wire.encode_request(wire.Request("r", "c", "m", 0, arr, budget_ms=10))
    back = wire.decode_request(raw)
    assert back.tensor is not None and back.tensor.flags.writeable and back.tensor.flags.owndata
    back.tensor += 1  # an in-place first block must not touch anything shared
    assert wire.decode_request(raw).tensor[0, 0] == 0


@given(raw=st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_bytes_raise_invalid_request_only(raw: bytes) -> None:
    for decode in (wire.decode_request, wire.decode_reply, wire.decode_plan):
        try:
            decode(raw)
        except InvalidRequest:
            pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(obj=st.dictionaries(st.sampled_from(["v", "kind", "req_id", "client", "model", "cut", "tensor",
                                            "budget_ms", "blob", "ok", "error", "plan"]), json_like, max_size=10))
@settings(max_examples=300, deadline=None)
def test_structured_garbage_raises_invalid_request_only(obj) -> None:
    obj.setdefault("v", 1)
    raw = msgpack.packb(obj, use_bin_type=True)
    for decode in (wire.decode_request, wire.decode_reply, wire.decode_plan):
        try:
            decode(raw)
        except InvalidRequest:
            pass


def _req(**over) -> bytes:
    obj = {"v": 1, "kind": "request", "req_id": "r", "client": "c", "model": "m", "cut": 0,
           "tensor": {"dtype": "float32", "shape": [2], "data": b"\0" * 8}, "budget_ms": 10.0}
    obj.update(over)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(("over", "exc", "needle"), [
    ({"v": 2}, InvalidRequest, "version"),
    ({"kind": "reply"}, InvalidRequest, "kind"),
    ({"req_id": ""}, InvalidRequest, "req_id"),
    ({"cut": "3"}, InvalidRequest, "cut"),
    ({"cut": True}, InvalidRequest, "cut"),
    ({"budget_ms": float("nan")}, InvalidRequest, "budget_ms"),
    ({"tensor": {"dtype": "complex64", "shape": [2], "data": b"\0" * 16}}, BadTensor, "dtype"),
    ({"tensor": {"dtype": "float32", "shape": [3], "data": b"\0" * 8}}, BadTensor, "needs 12"),
    ({"tensor": {"dtype": "float32", "shape": [-1], "data": b""}}, BadTensor, "non-negative"),
    ({"tensor": {"dtype": "float32", "shape": [1] * 9, "data": b"\0" * 4}}, BadTensor, "dimensions"),
    ({"tensor": {"dtype": "float32", "shape": [1 << 30], "data": b""}}, BadTensor, "limit"),
    ({"tensor": None}, BadTensor, "neither"),
])
def test_bad_fields_name_the_problem(over, exc, needle) -> None:
    with pytest.raises(exc) as info:
        wire.decode_request(_req(**over))
    assert needle in str(info.value)


def test_oversized_message_rejected_before_parsing() -> None:
    with pytest.raises(InvalidRequest, match="exceeds"):
        wire.unpackb(b"\x80" * 100, max_bytes=10)


def test_peek_ids_of_bad_request() -> None:
    assert wire.peek_ids(_req(v=9, req_id="abc", client="me")) == ("abc", "me")
    assert wire.peek_ids(b"\xff\x00garbage") == (None, None)


def test_error_codes_round_trip_to_types() -> None:
    for code in ErrorCode:
        err = error_for_code(str(code), "x", {"retry_after_ms": 250})
        assert err.code == code
    over = error_for_code("OVERLOADED", "busy", {"retry_after_ms": 250})
    assert isinstance(over, Overloaded) and over.retry_after_ms == 250
    assert error_for_code("NOPE", "x").code == ErrorCode.INTERNAL
    rep = wire.Reply.failure("r", Overloaded("busy", retry_after_ms=40))
    assert rep.error is not None and rep.error.details["retry_after_ms"] == 40


def test_plan_and_message_envelopes() -> None:
    plan = {"epoch": 3, "groups": [{"id": "g"}]}
    assert wire.decode_plan(wire.encode_plan(plan)) == plan
    assert wire.decode_message(wire.encode_message("stats", {"x": 1}), "stats")["x"] == 1
    with pytest.raises(InvalidRequest):
        wire.decode_message(wire.encode_message("stats", {}), "control")


# ------------------------------------------------------------------------------------------------ blobs


def test_blob_request_round_trip_carries_metadata_only() -> None:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    req = wire.Request("r-9", "c", "m", 3, arr, budget_ms=50.0, blob=keys.blob("r-9"))
    raw = wire.encode_request(req)
    obj = msgpack.unpackb(raw)
    assert obj["blob"] == "graft:blob:r-9"
    assert obj["tensor"] == {"dtype": "float32", "shape": [2, 3, 4], "data": None}
    assert len(raw) < 200  # the bytes are not in the envelope
    back = wire.decode_request(raw)
    assert back.tensor is None and back.blob == keys.blob("r-9")
    assert back.blob_meta == wire.TensorMeta("float32", (2, 3, 4)) and back.meta == back.blob_meta
    assert back.blob_meta.nbytes == arr.nbytes
    # The ingress re-encodes the decoded request for the group stream: the metadata survives.
    assert wire.decode_request(wire.encode_request(back)).blob_meta == back.blob_meta
    meta, data = wire.tensor_bytes(arr)
    assert meta == back.blob_meta and data == arr.tobytes()


def test_decoded_blob_is_a_writable_copy() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    buf = bytearray(arr.tobytes())
    out = wire.decode_blob(wire.TensorMeta.of(arr), buf, "graft:blob:x")
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable and out.flags.owndata
    buf[:4] = b"\xff" * 4
    out += 1  # neither writes into nor reads from the received buffer
    assert out[0, 0] == 1.0 and bytes(buf[4:8]) == arr.tobytes()[4:8]


def test_bad_blobs_name_the_problem() -> None:
    meta = wire.TensorMeta("float32", (2, 3))
    with pytest.raises(BadTensor, match="does not exist"):
        wire.decode_blob(meta, None, "graft:blob:x")
    with pytest.raises(BadTensor, match="holds 20 bytes") as short:
        wire.decode_blob(meta, b"\0" * 20, "graft:blob:x")
    assert short.value.details == {"key": "graft:blob:x", "expected": 24, "got": 20}
    with pytest.raises(BadTensor, match="raw bytes"):
        wire.decode_blob(meta, 42, "graft:blob:x")


@pytest.mark.parametrize(("over", "needle"), [
    ({"blob": "graft:blob:other"}, "blob key must be 'graft:blob:r'"),
    ({"blob": "secret:key"}, "blob key must be"),
    ({"blob": "graft:blob:r"}, "both inline tensor data and a blob"),
    ({"blob": "graft:blob:r", "tensor": None}, "dtype and shape"),
    ({"blob": "graft:blob:r", "tensor": {"dtype": "complex64", "shape": [2]}}, "dtype"),
    ({"blob": "graft:blob:r", "tensor": {"dtype": "float32", "shape": [1 << 30]}}, "limit"),
])
def test_bad_blob_references_are_bad_tensor(over, needle) -> None:
    with pytest.raises(BadTensor) as info:
        wire.decode_request(_req(**over))
    assert needle in str(info.value)


def test_blob_metadata_without_data_field_is_accepted() -> None:
    back = wire.decode_request(_req(blob="graft:blob:r", tensor={"dtype": "float32", "shape": [2]}))
    assert back.tensor is None and back.blob_meta == wire.TensorMeta("float32", (2,))


def test_peek_blob() -> None:
    assert wire.peek_blob(_req(v=9, blob="graft:blob:r", tensor={"dtype": "float32", "shape": [2]}))
    assert not wire.peek_blob(_req())  # inline
    assert not wire.peek_blob(b"\xff\x00garbage")

"""Ingress validation: each rule maps to its error code (no Redis)."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from redis.exceptions import ResponseError

from common.contract import keys, wire
from common.contract.errors import BadCut, BadTensor, ErrorCode, GraftError, InvalidRequest, UnknownModel
from common.model.zoo import describe
from services.ingress.validate import Limits, ModelCatalog, Validator, answerable_ids, blob_error, sane_id

RES = 32
INFO = describe("resnet18", RES)


@pytest.fixture(scope="module")
def validator() -> Validator:
    catalog = ModelCatalog(RES)
    catalog.serve(["resnet18"])
    return Validator(catalog, Limits(max_tensor_bytes=1 << 20, max_slo_ms=10_000.0))


def request(cut: int = 3, **kw: Any) -> wire.Request:
    fields: dict[str, Any] = {
        "req_id": "r-1", "client": "c-1", "model": "resnet18", "cut": cut,
        "tensor": np.zeros(INFO.cut_shape(cut), np.float32), "budget_ms": 50.0,
    }
    fields.update(kw)
    return wire.Request(**fields)


def code_of(validator: Validator, raw: object) -> ErrorCode:
    with pytest.raises(GraftError) as info:
        validator.check(raw)
    return info.value.code


@pytest.mark.parametrize("cut", [0, 1, 5, INFO.n_blocks - 1])
def test_valid_request_passes_with_server_budget(validator: Validator, cut: int) -> None:
    req = validator.check(wire.encode_request(request(cut)))
    assert (req.model, req.cut, req.budget_ms) == ("resnet18", cut, 50.0)
    assert req.tensor is not None and req.tensor.shape == INFO.cut_shape(cut)


def test_budget_from_slo_minus_device_time(validator: Validator) -> None:
    req = validator.check(wire.encode_request(request(budget_ms=None, slo_ms=120.0, device_ms=30.0)))
    assert req.budget_ms == pytest.approx(90.0)


@pytest.mark.parametrize("raw", [
    b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 99, "kind": "request"}),
    msgpack.packb({"v": 1, "kind": "reply", "req_id": "a"}), 12345,
])
def test_undecodable_envelope_is_invalid_request(validator: Validator, raw: object) -> None:
    assert code_of(validator, raw) is ErrorCode.INVALID_REQUEST


def test_missing_cut_field_is_invalid_request(validator: Validator) -> None:
    obj = msgpack.unpackb(wire.encode_request(request()))
    obj["cut"] = "three"
    assert code_of(validator, msgpack.packb(obj, use_bin_type=True)) is ErrorCode.INVALID_REQUEST


def test_unknown_model(validator: Validator) -> None:
    assert code_of(validator, wire.encode_request(request(model="resnet9000"))) is ErrorCode.UNKNOWN_MODEL


def test_known_model_not_in_plan_is_unknown(validator: Validator) -> None:
    with pytest.raises(UnknownModel, match="not served by the current plan"):
        validator.check(wire.encode_request(request(model="vgg16")))


@pytest.mark.parametrize("cut", [-1, INFO.n_blocks, 10_000])
def test_bad_cut(validator: Validator, cut: int) -> None:
    obj = msgpack.unpackb(wire.encode_request(request(3)))
    obj["cut"] = cut
    with pytest.raises(BadCut):
        validator.check(msgpack.packb(obj, use_bin_type=True))


def test_wrong_dtype_is_bad_tensor(validator: Validator) -> None:
    t = np.zeros(INFO.cut_shape(3), np.float64)
    with pytest.raises(BadTensor, match="float32"):
        validator.check(wire.encode_request(request(tensor=t)))


def test_wrong_shape_names_expected_and_got(validator: Validator) -> None:
    t = np.zeros((1, *INFO.cut_shape(3)), np.float32)  # a batch dim the contract forbids
    with pytest.raises(BadTensor) as info:
        validator.check(wire.encode_request(request(tensor=t)))
    expected, got = list(INFO.cut_shape(3)), [1, *INFO.cut_shape(3)]
    assert str(expected) in info.value.message and str(got) in info.value.message
    assert info.value.details == {"expected": expected, "got": got}


def test_tensor_bytes_that_disagree_with_shape_is_bad_tensor(validator: Validator) -> None:
    obj = msgpack.unpackb(wire.encode_request(request()))
    obj["tensor"]["data"] = obj["tensor"]["data"][:-4]
    assert code_of(validator, msgpack.packb(obj, use_bin_type=True)) is ErrorCode.BAD_TENSOR


def blob_request(cut: int = 3, shape: tuple[int, ...] | None = None, **kw: Any) -> wire.Request:
    meta = wire.TensorMeta("float32", shape or INFO.cut_shape(cut))
    return request(cut, tensor=None, blob=keys.blob("r-1"), blob_meta=meta, **kw)


def test_valid_blob_request_passes_on_its_metadata(validator: Validator) -> None:
    req = validator.check(wire.encode_request(blob_request(5)))
    assert req.tensor is None and req.blob == "graft:blob:r-1" and req.budget_ms == 50.0
    assert req.blob_meta is not None and req.blob_meta.shape == INFO.cut_shape(5)


def test_blob_metadata_follows_the_tensor_rules(validator: Validator) -> None:
    with pytest.raises(BadTensor) as info:
        validator.check(wire.encode_request(blob_request(3, shape=(1, *INFO.cut_shape(3)))))
    assert info.value.details == {"expected": list(INFO.cut_shape(3)), "got": [1, *INFO.cut_shape(3)]}
    f16 = request(tensor=None, blob=keys.blob("r-1"), blob_meta=wire.TensorMeta("float16", INFO.cut_shape(3)))
    with pytest.raises(BadTensor, match="float32"):
        validator.check(wire.encode_request(f16))
    small = Validator(validator.catalog, Limits(max_tensor_bytes=1024, max_slo_ms=10_000.0))
    assert code_of(small, wire.encode_request(blob_request(0))) is ErrorCode.INVALID_REQUEST
    assert code_of(validator, wire.encode_request(blob_request(budget_ms=None))) is ErrorCode.INVALID_REQUEST


def test_blob_under_another_key_is_bad_tensor(validator: Validator) -> None:
    raw = wire.encode_request(request(tensor=None, blob="graft:blob:r-2",
                                      blob_meta=wire.TensorMeta("float32", INFO.cut_shape(3))))
    with pytest.raises(BadTensor, match="graft:blob:r-1"):
        validator.check(raw)
    assert answerable_ids(raw) == ("r-1", "c-1")


def test_blob_error_judges_the_blob_length(validator: Validator) -> None:
    req = validator.check(wire.encode_request(blob_request(3)))
    want = 4 * math.prod(INFO.cut_shape(3))
    assert blob_error(req, want) is None
    missing = blob_error(req, 0)
    assert missing is not None and missing.code is ErrorCode.BAD_TENSOR and "does not exist" in missing.message
    short = blob_error(req, want - 4)
    assert short is not None and short.details == {"key": "graft:blob:r-1", "expected": want, "got": want - 4}
    assert f"holds {want - 4} bytes" in short.message and str(want) in short.message
    wrong_type = blob_error(req, ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    assert wrong_type is not None and "not a string" in wrong_type.message


@pytest.mark.parametrize("budget", [
    {"budget_ms": None}, {"budget_ms": 0.0}, {"budget_ms": -5.0}, {"budget_ms": 10_001.0},
    {"budget_ms": None, "slo_ms": 50.0, "device_ms": 60.0}, {"budget_ms": None, "slo_ms": 20_000.0},
    {"budget_ms": None, "slo_ms": 50.0, "device_ms": -1.0},
])
def test_budget_rules_are_invalid_request(validator: Validator, budget: dict[str, Any]) -> None:
    assert code_of(validator, wire.encode_request(request(**budget))) is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_budget_is_invalid_request(validator: Validator, value: float) -> None:
    obj = msgpack.unpackb(wire.encode_request(request()))
    obj["budget_ms"] = value
    assert code_of(validator, msgpack.packb(obj, use_bin_type=True)) is ErrorCode.INVALID_REQUEST


def test_tensor_over_size_limit_is_invalid_request() -> None:
    catalog = ModelCatalog(RES)
    catalog.serve(["resnet18"])
    small = Validator(catalog, Limits(max_tensor_bytes=1024, max_slo_ms=10_000.0))
    raw = wire.encode_request(request(0))  # 3x32x32 float32 = 12 KiB
    with pytest.raises(InvalidRequest) as info:
        small.check(raw)
    assert info.value.code is ErrorCode.INVALID_REQUEST and "exceeds the limit" in info.value.message
    huge = b"\x00" * (1024 + 65 * 1024)
    assert code_of(small, huge) is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("ids", [{"client": "has space"}, {"req_id": "tab\tid"}, {"client": "bell\x07"}])
def test_insane_ids_are_rejected_and_not_answerable(validator: Validator, ids: dict[str, str]) -> None:
    raw = wire.encode_request(request(**ids))
    assert code_of(validator, raw) is ErrorCode.INVALID_REQUEST
    assert answerable_ids(raw) is None


def test_answerable_ids_of_a_bad_body() -> None:
    obj = msgpack.unpackb(wire.encode_request(request()))
    obj["tensor"] = "nonsense"
    assert answerable_ids(msgpack.packb(obj, use_bin_type=True)) == ("r-1", "c-1")
    assert answerable_ids(b"\xc1\xc1") is None
    assert answerable_ids(msgpack.packb({"v": 1, "req_id": "x"})) is None


def test_sane_id() -> None:
    assert sane_id("loadgen-3/device:17") and not sane_id("") and not sane_id("x" * 300) and not sane_id(7)


def test_catalog_describes_each_model_once_and_follows_the_plan() -> None:
    calls: list[tuple[str, int | None]] = []

    def counting(name: str, resolution: int | None) -> Any:
        calls.append((name, resolution))
        return describe(name, resolution)

    catalog = ModelCatalog(RES, counting)
    catalog.serve(["resnet18"])
    catalog.serve(["resnet18", "mobilenet_v2"])
    catalog.serve(["mobilenet_v2"])
    catalog.serve(["resnet18", "mobilenet_v2"])
    assert calls == [("resnet18", RES), ("mobilenet_v2", RES)]
    assert catalog.cut_shape("resnet18", 0) == (3, RES, RES)
    catalog.serve(["mobilenet_v2"])
    with pytest.raises(UnknownModel):
        catalog.cut_shape("resnet18", 0)

"""The gateway's mapping between the Open Inference Protocol and Graft, with no process and no network:
input names, shapes, budgets, the error tables, answers of several rows, the HTTP body codec (checked
against tritonclient's own request builder and response parser) and the gRPC message conversion."""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2

from common.contract import wire
from common.contract.errors import ErrorCode
from common.contract.routing import PlanView
from common.model.zoo import describe
from services.gateway.catalog import Catalog
from services.gateway.grpc_api import GrpcApi, call_of, parameter_value, response_of, set_parameter
from services.gateway.http_codec import encode_infer, parse_infer, split_body
from services.gateway.mapping import (
    GRPC_STATUS,
    HTTP_STATUS,
    NOT_FOUND,
    TIMEOUT,
    UNAVAILABLE,
    Answer,
    Budget,
    GatewayError,
    answer,
    budget_of,
    check_datatype,
    check_shape,
    cut_of,
    input_name,
    tensor_from_bytes,
    tensor_from_list,
)

# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize(("name", "cut"), [
    ("cut_0", 0), ("cut_13", 13), ("cut_120", 120),
    ("cut_01", None), ("cut_-1", None), ("cut_", None), ("cut_1.0", None), ("input__0", None), ("CUT_1", None),
    ("cut_\u0663", None),  # an Arabic-Indic digit: isdigit() but not a cut
])
def test_an_input_name_is_cut_and_the_cut_number(name: str, cut: int | None) -> None:
    assert cut_of(name) == cut
    if cut is not None:
        assert input_name(cut) == name


def test_shapes_need_a_batch_dimension_and_the_cuts_row_shape() -> None:
    assert check_shape("cut_4", [3, 64, 8, 8], (64, 8, 8)) == 3
    for bad in ([64, 8, 8], [0, 64, 8, 8], [1, 64, 8, 9], [1, 64, 64], [2, 64, 8, 8, 1]):
        with pytest.raises(GatewayError) as err:
            check_shape("cut_4", bad, (64, 8, 8))
        assert err.value.code == ErrorCode.BAD_TENSOR
        assert err.value.details == {"expected": [-1, 64, 8, 8], "got": bad}
    for garbage in ([1, "64", 8, 8], [True, 64, 8, 8], "1,64,8,8", None):
        with pytest.raises(GatewayError) as err:
            check_shape("cut_4", garbage, (64, 8, 8))  # type: ignore[arg-type]
        assert err.value.code == ErrorCode.INVALID_REQUEST
    check_datatype("cut_4", "FP32")
    for dt in ("FP16", "fp32", "INT32", None):
        with pytest.raises(GatewayError, match="datatype must be FP32"):
            check_datatype("cut_4", dt)


def test_tensor_data_must_fill_the_shape_exactly() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(tensor_from_bytes("cut_1", x.tobytes(), (2, 6)), x)
    np.testing.assert_array_equal(tensor_from_list("cut_1", x.tolist(), (2, 6)), x)  # nested
    np.testing.assert_array_equal(tensor_from_list("cut_1", x.ravel().tolist(), (2, 6)), x)  # flat
    with pytest.raises(GatewayError, match="47 bytes of data, shape \\[2, 6\\] of FP32 needs 48"):
        tensor_from_bytes("cut_1", x.tobytes()[:-1], (2, 6))
    with pytest.raises(GatewayError, match="11 values of data"):
        tensor_from_list("cut_1", list(range(11)), (2, 6))
    with pytest.raises(GatewayError, match="data must be numbers"):
        tensor_from_list("cut_1", ["a"] * 12, (2, 6))


# ----------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(("params", "deadline", "want"), [
    ({"budget_ms": 250}, None, Budget(budget_ms=250.0)),
    ({"budget_ms": 250, "timeout": 9, "slo_ms": 1}, None, Budget(budget_ms=250.0)),  # budget_ms wins
    ({"timeout": 300_000}, None, Budget(budget_ms=300.0)),
    ({"timeout": 0, "slo_ms": 500}, None, Budget(slo_ms=500.0, device_ms=0.0)),  # timeout 0: none (Triton's default)
    ({"slo_ms": 500, "device_ms": 120.5}, None, Budget(slo_ms=500.0, device_ms=120.5)),
    ({}, None, Budget(budget_ms=1000.0)),
    ({"priority": 3}, None, Budget(budget_ms=1000.0)),  # other parameters are not a budget
    ({}, 0.25, Budget(budget_ms=250.0)),  # a client deadline below the default
    ({}, 30.0, Budget(budget_ms=1000.0)),  # ... and one above it
    ({"budget_ms": 5000}, 0.25, Budget(budget_ms=5000.0)),  # an explicit budget is the client's call
])
def test_the_budget_comes_from_the_first_parameter_given(params: dict[str, Any], deadline: float | None,
                                                         want: Budget) -> None:
    assert budget_of(params, 1000.0, deadline) == want
    assert want.server_ms == (want.budget_ms if want.budget_ms is not None else 500.0 - (want.device_ms or 0.0))


@pytest.mark.parametrize("params", [{"budget_ms": "200"}, {"budget_ms": True}, {"timeout": "soon"},
                                    {"slo_ms": [1]}, {"device_ms": 5.0}])
def test_budget_parameters_of_the_wrong_kind_are_invalid_requests(params: dict[str, Any]) -> None:
    with pytest.raises(GatewayError) as err:
        budget_of(params, 1000.0)
    assert err.value.code == ErrorCode.INVALID_REQUEST and err.value.http_status == 400


# ----------------------------------------------------------------------------------------- errors


def test_every_graft_code_and_every_gateway_code_has_an_http_and_a_grpc_status() -> None:
    codes = [*ErrorCode, NOT_FOUND, UNAVAILABLE, TIMEOUT]
    assert set(HTTP_STATUS) == set(GRPC_STATUS) == set(codes)
    want = {"INVALID_REQUEST": (400, "INVALID_ARGUMENT"), "BAD_CUT": (400, "INVALID_ARGUMENT"),
            "BAD_TENSOR": (400, "INVALID_ARGUMENT"), "UNKNOWN_MODEL": (404, "NOT_FOUND"),
            "NOT_FOUND": (404, "NOT_FOUND"), "OVERLOADED": (429, "RESOURCE_EXHAUSTED"),
            "DEADLINE_EXCEEDED": (504, "DEADLINE_EXCEEDED"), "TIMEOUT": (504, "DEADLINE_EXCEEDED"),
            "INTERNAL": (500, "INTERNAL"), "UNAVAILABLE": (503, "UNAVAILABLE")}
    for code in codes:
        err = GatewayError(code, "m")
        assert (err.http_status, err.grpc_status.name) == want[code]
    assert GatewayError("NEVER_HEARD_OF_IT", "m").http_status == 500
    assert GatewayError("NEVER_HEARD_OF_IT", "m").grpc_status is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(("retry_ms", "seconds"), [(1, 1), (999, 1), (1000, 1), (1001, 2), (2500, 3), (0, 1)])
def test_retry_after_is_whole_seconds_rounded_up(retry_ms: int, seconds: int) -> None:
    err = GatewayError(ErrorCode.OVERLOADED, "busy", {"retry_after_ms": retry_ms})
    assert err.retry_after_s == seconds and err.retry_after_ms == retry_ms
    assert err.text() == f"OVERLOADED: busy (retry_after_ms={retry_ms})"
    assert GatewayError(ErrorCode.INTERNAL, "x", {"retry_after_ms": 5}).retry_after_s is None
    assert GatewayError(ErrorCode.OVERLOADED, "x", {"retry_after_ms": "5"}).retry_after_s is None


# ---------------------------------------------------------------------------------------- answers


def ok(i: int, **kw: Any) -> wire.Reply:
    return wire.Reply.result(f"r{i}", np.full(3, float(i), np.float32), **kw)


def test_rows_are_answered_stacked_in_order_with_their_facts() -> None:
    replies = [ok(0, server_ms=2.0, epoch=3, group="g1", batch=4, timings={"compute_ms": 1.0}),
               ok(1, server_ms=5.0, epoch=4, group="g2", batch=2)]
    ans = answer(replies)
    np.testing.assert_array_equal(ans.output, [[0, 0, 0], [1, 1, 1]])
    assert ans.output.dtype == np.float32
    p = ans.parameters
    assert (p["server_ms"], p["epoch"], p["group"], p["batch"]) == (5.0, 4, "g1,g2", 4)
    assert json.loads(str(p["rows"])) == [
        {"server_ms": 2.0, "epoch": 3, "group": "g1", "batch": 4, "timings": {"compute_ms": 1.0}},
        {"server_ms": 5.0, "epoch": 4, "group": "g2", "batch": 2}]
    one = answer([ok(7, server_ms=1.25, epoch=1, group="g", batch=1, timings={"queue_ms": 0.5})]).parameters
    assert one == {"server_ms": 1.25, "epoch": 1, "group": "g", "batch": 1, "timings": '{"queue_ms":0.5}'}


def test_the_first_failed_row_answers_for_the_whole_request() -> None:
    fail = wire.Reply(req_id="r1", ok=False, error=wire.ErrorInfo("OVERLOADED", "busy", {"retry_after_ms": 40}))
    other = wire.Reply(req_id="r2", ok=False, error=wire.ErrorInfo("BAD_CUT", "no"))
    with pytest.raises(GatewayError) as err:
        answer([ok(0), fail, other])
    assert err.value.code == "OVERLOADED" and err.value.message == "row 1 of 3: busy"
    assert err.value.details == {"retry_after_ms": 40, "row": 1} and err.value.retry_after_s == 1
    with pytest.raises(GatewayError) as err:
        answer([other])
    assert err.value.code == "BAD_CUT" and err.value.message == "no" and err.value.details == {}
    odd = wire.Reply(req_id="r3", ok=False, error=wire.ErrorInfo("FROM_THE_FUTURE", "hm"))
    with pytest.raises(GatewayError) as err:
        answer([odd])
    assert err.value.code == "INTERNAL" and err.value.message == "FROM_THE_FUTURE: hm"


# ------------------------------------------------------------------------------------- HTTP codec


def test_tritonclients_binary_request_parses_into_the_call_it_stands_for() -> None:
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    inp = httpclient.InferInput("cut_2", [2, 4, 3], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], request_id="abc", timeout=2000, parameters={"budget_ms": 25.5})
    header, binary = split_body(body, str(json_size))
    call, binary_out = parse_infer("m", "", header, binary)
    assert binary_out is True  # no outputs named: tritonclient asks for binary outputs
    [t] = call.inputs
    assert (t.name, t.datatype, t.shape, t.values) == ("cut_2", "FP32", [2, 4, 3], None)
    assert t.raw is not None
    np.testing.assert_array_equal(tensor_from_bytes("cut_2", t.raw, (2, 4, 3)), x)
    assert call.parameters == {"timeout": 2000, "budget_ms": 25.5, "binary_data_output": True}
    assert header["id"] == "abc" and call.outputs == []


def test_json_requests_and_output_choices() -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    inp = httpclient.InferInput("cut_0", [1, 6], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = httpclient.InferRequestedOutput("logits", binary_data=False)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
    assert json_size is None  # nothing binary: the body is plain JSON
    header, binary = split_body(body, None)
    call, binary_out = parse_infer("m", "1", header, binary)
    assert binary_out is False and call.outputs == ["logits"] and call.version == "1"
    np.testing.assert_array_equal(tensor_from_list("cut_0", call.inputs[0].values, (1, 6)), x)
    # A request-level binary_data_output, overridden per output.
    for params, outputs, want in (({"binary_data_output": True}, None, True),
                                  ({"binary_data_output": True}, [{"name": "logits", "parameters": {"binary_data": False}}], False),
                                  ({}, [{"name": "logits", "parameters": {"binary_data": True}}], True),
                                  ({}, [{"name": "logits"}], False)):
        h = {"inputs": header["inputs"], "parameters": params, **({"outputs": outputs} if outputs else {})}
        assert parse_infer("m", "", h, memoryview(b""))[1] is want


@pytest.mark.parametrize("binary", [True, False])
def test_responses_read_back_with_tritonclients_parser(binary: bool) -> None:
    out = np.random.default_rng(1).standard_normal((2, 1000)).astype(np.float32)
    ans = Answer(out, {"server_ms": 3.5, "epoch": 2, "group": "g", "batch": 2})
    body, head_len = encode_infer("resnet18", "req-9", ans, binary)
    assert (head_len is not None) is binary
    result = httpclient.InferResult.from_response_body(body, header_length=head_len)
    np.testing.assert_array_equal(result.as_numpy("logits"), out)
    resp = result.get_response()
    assert resp["model_name"] == "resnet18" and resp["id"] == "req-9" and resp["parameters"]["epoch"] == 2
    assert resp["outputs"][0]["shape"] == [2, 1000] and resp["outputs"][0]["datatype"] == "FP32"


@pytest.mark.parametrize(("body", "length", "match"), [
    (b"[1, 2]", None, "must be a JSON object"),
    (b"{", None, "not valid JSON"),
    (b"{}", "x", "must be an integer"),
    (b"{}", "0", "outside the body"),
    (b"{}", "3", "outside the body"),
])
def test_bodies_that_are_not_oip_requests(body: bytes, length: str | None, match: str) -> None:
    with pytest.raises(GatewayError, match=match) as err:
        split_body(body, length)
    assert err.value.code == ErrorCode.INVALID_REQUEST


# ---------------------------------------------------------------------------------------------- gRPC


def test_grpc_requests_and_responses_convert_both_ways() -> None:
    x = np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32)
    req = service_pb2.ModelInferRequest(model_name="m", model_version="1", id="q")
    t = req.inputs.add()
    t.name, t.datatype = "cut_3", "FP32"
    t.shape.extend([2, 5])
    req.raw_input_contents.append(x.tobytes())
    for key, value in {"budget_ms": 12.5, "timeout": 3000, "tag": "a", "flag": True}.items():
        set_parameter(req.parameters[key], value)
    req.outputs.add().name = "logits"
    call = call_of(req, 0.75)
    assert (call.model, call.version, call.outputs, call.deadline_s) == ("m", "1", ["logits"], 0.75)
    assert call.parameters == {"budget_ms": 12.5, "timeout": 3000, "tag": "a", "flag": True}
    [inp] = call.inputs
    assert inp.raw is not None and (inp.name, inp.datatype, inp.shape) == ("cut_3", "FP32", [2, 5])
    np.testing.assert_array_equal(tensor_from_bytes("cut_3", inp.raw, (2, 5)), x)
    # Typed contents instead of raw bytes.
    typed = service_pb2.ModelInferRequest(model_name="m")
    t = typed.inputs.add()
    t.name, t.datatype = "cut_3", "FP32"
    t.shape.extend([2, 5])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    np.testing.assert_array_equal(tensor_from_list("cut_3", call_of(typed, None).inputs[0].values, (2, 5)), x)
    assert parameter_value(service_pb2.InferParameter()) is None
    # The response, read back by tritonclient.
    out = np.ones((2, 1000), np.float32)
    resp = response_of(call, "q", Answer(out, {"server_ms": 1.5, "epoch": 7, "group": "g", "flag": False}))
    result = grpcclient.InferResult(resp)
    np.testing.assert_array_equal(result.as_numpy("logits"), out)
    params = result.get_response().parameters
    assert params["server_ms"].double_param == 1.5 and params["epoch"].int64_param == 7
    assert params["group"].string_param == "g" and params["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert result.get_response().id == "q" and result.get_response().model_version == "1"


def test_mismatched_raw_contents_are_invalid() -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    req.inputs.add().name = "cut_0"
    req.raw_input_contents.extend([b"", b""])
    with pytest.raises(GatewayError, match="2 raw_input_contents for 1 inputs"):
        call_of(req, None)


def test_the_grpc_service_is_the_one_tritonclient_calls() -> None:
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    for method in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"):
        assert method in service.methods_by_name and method in GrpcApi.__dict__, method


# ------------------------------------------------------------------------------------------ catalog


def test_the_catalog_serves_the_plans_models_with_one_input_per_cut() -> None:
    cat = Catalog(32)
    assert not cat.has_plan and cat.get("resnet18") is None
    plan = {"epoch": 4, "groups": [{"id": "g", "model": "resnet18", "cuts": [2], "batch": 4, "share": 1,
                                    "replicas": 1}], "placement": []}
    cat.serve(PlanView(plan))
    assert cat.has_plan and cat.epoch == 4 and cat.models == ["resnet18"]
    sig = cat.get("resnet18")
    assert sig is not None and cat.get("mobilenet_v2") is None
    info = describe("resnet18", 32)
    meta = sig.metadata()
    assert [i["name"] for i in meta["inputs"]] == [f"cut_{c}" for c in range(info.n_blocks)]
    assert all(i["shape"] == [-1, *info.cut_shape(c)] and i["datatype"] == "FP32"
               for c, i in enumerate(meta["inputs"]))
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert sig.input("cut_3", 3) is not None and sig.input("cut_3", 4) is None and sig.input("cut_99", 99) is None
    cat.serve(PlanView({**plan, "epoch": 5, "groups": []}))
    assert cat.has_plan and cat.models == [] and cat.get("resnet18") is None

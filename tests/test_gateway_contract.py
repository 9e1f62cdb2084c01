"""The gateway process against a scripted Graft: a real ``python -m services.gateway`` on a real Redis,
driven by NVIDIA's tritonclient (asyncio flavours) and raw HTTP, with a stand-in for ingress and workers
that answers each request as a test says — every reply code, a stalled system, a plan not yet published.
What the gateway sends to Graft (rows, cuts, budgets) is checked where Graft would see it: in the stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from common.contract import wire
from common.contract.errors import ErrorCode, GraftError, error_for_code
from common.settings import Settings
from common.store.connection import connect
from common.store.plan_store import publish_plan
from tests.gateway_helpers import (
    ScriptedGraft,
    fixed_plan,
    free_port,
    http_status,
    metric,
    scripted,
    until_async,
)
from tools.redis_server import RedisServer
from tools.up import System, start_system

RES = 32
MODEL = "resnet18"
SMALL = (512, 1, 1)  # resnet18's cut 13 at any resolution: the pooled features the fc layer reads

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Harness:
    system: System
    graft: ScriptedGraft
    http_port: int
    grpc_port: int
    metrics_port: int
    before_plan: dict[str, Any] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


async def _status_of(coro: Any) -> str:
    try:
        await coro
    except InferenceServerException as exc:
        return str(exc.status())
    return "ok"


def http_input(x: np.ndarray, cut: int = 13, binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput(f"cut_{cut}", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def grpc_input(x: np.ndarray, cut: int = 13) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(f"cut_{cut}", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def harness(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    tmp = tmp_path_factory.mktemp("gateway-contract")
    hp, gp, mp = free_port(), free_port(), free_port()
    with RedisServer() as server:
        r = connect(server.url, settings=Settings())
        graft = ScriptedGraft(r).start()
        settings = Settings(redis_url=server.url, models=(MODEL,), resolution=RES, log_level="warning",
                            gateway_http_port=hp, gateway_grpc_port=gp, metrics_port=mp - 3, default_budget_ms=700.0)
        system = await start_system(settings, tmp / "unused-profile.json", log_dir=tmp / "logs", services=("gateway",))
        h = Harness(system, graft, hp, gp, mp)
        try:
            await until_async(lambda: http_status(f"http://{h.http}/v2/health/live"), 60, "the gateway to listen")
            # Before any plan: alive, not ready, and inference is UNAVAILABLE on both protocols.
            h.before_plan["http_ready"] = await http_status(f"http://{h.http}/v2/health/ready")
            async with aiohttp.ClientSession() as s, s.post(f"http://{h.http}/v2/models/{MODEL}/infer",
                                                            json={"inputs": []}) as resp:
                h.before_plan["http_infer"] = (resp.status, await resp.json())
            g = grpcaio.InferenceServerClient(h.grpc)
            try:
                h.before_plan["grpc_live"] = await g.is_server_live()
                h.before_plan["grpc_ready"] = await g.is_server_ready()
                x = np.zeros((1, *SMALL), np.float32)
                h.before_plan["grpc_infer"] = await _status_of(g.infer(MODEL, [grpc_input(x)]))
                h.before_plan["grpc_metadata"] = await _status_of(g.get_model_metadata(MODEL))
            finally:
                await g.close()
            await publish_plan(r, fixed_plan(1, MODEL, [0]))
            deadline = time.monotonic() + 30
            while await http_status(f"http://{h.http}/v2/health/ready") != 200:
                assert time.monotonic() < deadline, "the gateway never became ready after the plan was published"
                await asyncio.sleep(0.05)
            yield h
        finally:
            await system.stop()
            await graft.stop()
            await r.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def clients(harness: Harness) -> AsyncIterator[tuple[httpaio.InferenceServerClient, grpcaio.InferenceServerClient]]:
    harness.graft.take()
    h, g = httpaio.InferenceServerClient(harness.http), grpcaio.InferenceServerClient(harness.grpc)
    try:
        yield h, g
    finally:
        await h.close()
        await g.close()


# --------------------------------------------------------------------------------------- lifecycle


async def test_without_a_plan_the_gateway_is_live_not_ready_and_answers_unavailable(harness: Harness) -> None:
    before = harness.before_plan
    assert before["http_ready"] == 400
    status, body = before["http_infer"]
    assert status == 503 and body["code"] == "UNAVAILABLE" and body["error"].startswith("UNAVAILABLE: no plan")
    assert before["grpc_live"] is True and before["grpc_ready"] is False
    assert before["grpc_infer"] == "StatusCode.UNAVAILABLE"
    assert before["grpc_metadata"] == "StatusCode.UNAVAILABLE"
    async with aiohttp.ClientSession() as s, s.get(f"http://{harness.http}/v2/health/ready") as resp:
        assert resp.status == 200  # once the plan is out


# --------------------------------------------------------------------------------- error mapping

CODES = [  # reply code → HTTP status, gRPC status
    (ErrorCode.INVALID_REQUEST, 400, "INVALID_ARGUMENT"), (ErrorCode.BAD_CUT, 400, "INVALID_ARGUMENT"),
    (ErrorCode.BAD_TENSOR, 400, "INVALID_ARGUMENT"), (ErrorCode.UNKNOWN_MODEL, 404, "NOT_FOUND"),
    (ErrorCode.OVERLOADED, 429, "RESOURCE_EXHAUSTED"), (ErrorCode.DEADLINE_EXCEEDED, 504, "DEADLINE_EXCEEDED"),
    (ErrorCode.INTERNAL, 500, "INTERNAL"), ("SOMETHING_NEW", 500, "INTERNAL"),
]


def failing(code: str, **details: Any) -> Any:
    def script(req: wire.Request) -> wire.Reply:
        exc: GraftError = error_for_code(code, f"scripted {code}", details)
        if code == "SOMETHING_NEW":
            return wire.Reply(req.req_id, ok=False, error=wire.ErrorInfo(code, "a code from the future", {}))
        return wire.Reply.failure(req.req_id, exc)
    return script


@pytest.mark.parametrize(("code", "http", "rpc"), CODES)
async def test_every_reply_code_maps_to_the_http_and_grpc_status_clients_expect(
        harness: Harness, clients: Any, code: str, http: int, rpc: str) -> None:
    h, g = clients
    x = np.ones((1, *SMALL), np.float32)
    details = {"retry_after_ms": 1500} if code == ErrorCode.OVERLOADED else {}
    async with scripted(harness.graft, failing(code, **details)):
        with pytest.raises(InferenceServerException) as http_err:
            await h.infer(MODEL, [http_input(x)])
        with pytest.raises(InferenceServerException) as grpc_err:
            await g.infer(MODEL, [grpc_input(x)])
        # The raw answers: the JSON error body, Retry-After, and gRPC's trailing metadata.
        body = json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]})
        async with aiohttp.ClientSession() as s, s.post(f"http://{harness.http}/v2/models/{MODEL}/infer",
                                                        data=body) as resp:
            raw_status, raw_body, retry_after = resp.status, await resp.json(), resp.headers.get("Retry-After")
        async with grpc.aio.insecure_channel(harness.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            req = service_pb2.ModelInferRequest(model_name=MODEL)
            t = req.inputs.add()
            t.name, t.datatype = "cut_13", "FP32"
            t.shape.extend([1, 512, 1, 1])
            req.raw_input_contents.append(x.tobytes())
            call = stub.ModelInfer(req)
            with pytest.raises(grpc.aio.AioRpcError):
                await call
            trailing = dict(await call.trailing_metadata() or ())
    assert http_err.value.status() == str(http) and raw_status == http
    assert grpc_err.value.status() == f"StatusCode.{rpc}"
    want = "INTERNAL" if code == "SOMETHING_NEW" else code
    assert raw_body["code"] == want and raw_body["error"].startswith(f"{want}: "), raw_body
    assert str(http_err.value.message()).startswith(f"{want}: ") and str(grpc_err.value.message()).startswith(f"{want}: ")
    if code == ErrorCode.OVERLOADED:
        assert retry_after == "2" and raw_body["details"]["retry_after_ms"] == 1500  # 1.5 s rounded up
        assert trailing.get("retry-after-ms") == "1500"
        assert "retry_after_ms=1500" in raw_body["error"]
    else:
        assert retry_after is None and "retry-after-ms" not in trailing
    assert len(harness.graft.take()) == 4  # each attempt reached Graft exactly once


# --------------------------------------------------------------------------------- rows and budgets


async def test_each_row_is_one_graft_request_and_answers_come_back_in_row_order(harness: Harness, clients: Any) -> None:
    h, g = clients
    x = np.arange(5 * 512, dtype=np.float32).reshape(5, *SMALL) / 1000.0
    res_h = await h.infer(MODEL, [http_input(x)], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
    res_g = await g.infer(MODEL, [grpc_input(x)])
    want = np.repeat(x.reshape(5, -1).sum(axis=1, dtype=np.float32)[:, None], 1000, axis=1)
    for res in (res_h, res_g):
        out = res.as_numpy("logits")
        assert out.shape == (5, 1000) and out.dtype == np.float32
        np.testing.assert_allclose(out, want, rtol=1e-5)
    seen = harness.graft.take()
    assert len(seen) == 10 and {r.cut for r in seen} == {13} and {r.model for r in seen} == {MODEL}
    assert all(r.tensor is not None and r.tensor.shape == SMALL for r in seen)
    params = res_h.get_response()["parameters"]
    rows = json.loads(params["rows"])
    assert len(rows) == 5 and rows[0] == {"server_ms": 1.5, "epoch": 1, "group": "g", "batch": 1,
                                          "timings": {"compute_ms": 0.5}}
    assert params["server_ms"] == 1.5 and params["epoch"] == 1 and params["group"] == "g" and params["batch"] == 1
    gparams = res_g.get_response().parameters
    assert gparams["server_ms"].double_param == 1.5 and gparams["epoch"].int64_param == 1
    assert json.loads(gparams["rows"].string_param) == rows


async def test_one_failed_row_fails_the_whole_request_with_that_rows_error(harness: Harness, clients: Any) -> None:
    h, g = clients
    x = np.zeros((4, *SMALL), np.float32)
    x[2] = 1.0  # row 2 is refused

    def script(req: wire.Request) -> wire.Reply:
        assert req.tensor is not None
        if req.tensor.sum() > 0:
            return wire.Reply.failure(req.req_id, error_for_code("BAD_TENSOR", "row refused"))
        return wire.Reply.result(req.req_id, np.zeros(1000, np.float32))

    async with scripted(harness.graft, script):
        with pytest.raises(InferenceServerException) as err:
            await h.infer(MODEL, [http_input(x)])
        with pytest.raises(InferenceServerException) as grpc_err:
            await g.infer(MODEL, [grpc_input(x)])
    assert err.value.status() == "400" and err.value.message() == "BAD_TENSOR: row 2 of 4: row refused"
    assert grpc_err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc_err.value.message() == "BAD_TENSOR: row 2 of 4: row refused"


@pytest.mark.parametrize(("params", "want"), [
    ({"budget_ms": 250.0}, (250.0, None, None)),
    ({"timeout": 300_000}, (300.0, None, None)),  # µs, the timeout extension
    ({"slo_ms": 400.0, "device_ms": 120.0}, (None, 400.0, 120.0)),
    ({}, (700.0, None, None)),  # GRAFT_DEFAULT_BUDGET_MS of this gateway
])
async def test_the_budget_comes_from_the_request_parameters(harness: Harness, clients: Any, params: dict[str, Any],
                                                            want: tuple[Any, ...]) -> None:
    h, g = clients
    x = np.zeros((1, *SMALL), np.float32)
    timeout = params.pop("timeout", None)
    await h.infer(MODEL, [http_input(x)], parameters=params or None, timeout=timeout)
    await g.infer(MODEL, [grpc_input(x)], parameters=params or None, timeout=timeout)
    seen = harness.graft.take()
    assert [(r.budget_ms, r.slo_ms, r.device_ms) for r in seen] == [want, want]


async def test_a_grpc_deadline_without_a_budget_becomes_the_budget(harness: Harness, clients: Any) -> None:
    _, g = clients
    await g.infer(MODEL, [grpc_input(np.zeros((1, *SMALL), np.float32))], client_timeout=0.6)
    [req] = harness.graft.take()
    # What is left of the deadline, not the 700 ms default. gRPC sends the timeout rounded up to a coarser
    # unit (grpc-timeout carries at most 8 digits and rounds up), so the server may see a hair more.
    assert req.budget_ms is not None and 0.0 < req.budget_ms <= 601.0


async def test_json_and_binary_tensors_give_the_same_answer(harness: Harness, clients: Any) -> None:
    h, _ = clients
    x = np.random.default_rng(3).standard_normal((2, *SMALL)).astype(np.float32)
    as_json = await h.infer(MODEL, [http_input(x, binary=False)],
                            outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)])
    as_binary = await h.infer(MODEL, [http_input(x, binary=True)])
    assert "data" in as_json.get_response()["outputs"][0]  # a JSON answer when no binary output was asked for
    np.testing.assert_array_equal(as_json.as_numpy("logits"), as_binary.as_numpy("logits"))
    seen = harness.graft.take()
    assert len(seen) == 4
    np.testing.assert_array_equal(np.stack([r.tensor for r in seen[:2]]), x)


# ----------------------------------------------------------------------------- malformed requests

MALFORMED = [
    ("not json", b"{nope", {}, "INVALID_REQUEST"),
    ("no inputs", json.dumps({"inputs": []}).encode(), {}, "INVALID_REQUEST"),
    ("two inputs", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "FP32", "data": [0] * 512}] * 2}).encode(),
     {}, "INVALID_REQUEST"),
    ("unknown input", json.dumps({"inputs": [{"name": "cut_99", "shape": [1, 512, 1, 1], "datatype": "FP32", "data": [0] * 512}]}).encode(),
     {}, "INVALID_REQUEST"),
    ("not a cut", json.dumps({"inputs": [{"name": "input0", "shape": [1, 512, 1, 1], "datatype": "FP32", "data": [0] * 512}]}).encode(),
     {}, "INVALID_REQUEST"),
    ("wrong shape", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 256], "datatype": "FP32", "data": [0] * 256}]}).encode(),
     {}, "BAD_TENSOR"),
    ("no batch dim", json.dumps({"inputs": [{"name": "cut_13", "shape": [512, 1, 1], "datatype": "FP32", "data": [0] * 512}]}).encode(),
     {}, "BAD_TENSOR"),
    ("wrong datatype", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "INT32", "data": [0] * 512}]}).encode(),
     {}, "BAD_TENSOR"),
    ("too little data", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "FP32", "data": [0] * 5}]}).encode(),
     {}, "BAD_TENSOR"),
    ("unknown output", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "FP32", "data": [0] * 512}],
                                   "outputs": [{"name": "probabilities"}]}).encode(), {}, "INVALID_REQUEST"),
    ("header past the body", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "INVALID_REQUEST"),
    ("binary size past the data", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "FP32",
                                                          "parameters": {"binary_data_size": 2048}}]}).encode() + b"\0" * 100,
     "header", "INVALID_REQUEST"),
    ("binary left over", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "FP32",
                                                 "parameters": {"binary_data_size": 2048}}]}).encode() + b"\0" * 2052,
     "header", "INVALID_REQUEST"),
    ("budget of the wrong type", json.dumps({"inputs": [{"name": "cut_13", "shape": [1, 512, 1, 1], "datatype": "FP32",
                                                         "data": [0] * 512}], "parameters": {"budget_ms": "soon"}}).encode(),
     {}, "INVALID_REQUEST"),
]


@pytest.mark.parametrize(("what", "body", "headers", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_requests_are_400_and_never_reach_graft(harness: Harness, what: str, body: bytes,
                                                                headers: Any, code: str) -> None:
    harness.graft.take()
    if headers == "header":
        headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}
    async with aiohttp.ClientSession() as s, s.post(f"http://{harness.http}/v2/models/{MODEL}/infer", data=body,
                                                    headers=headers) as resp:
        assert resp.status == 400, (what, await resp.text())
        answer = await resp.json()
    assert answer["code"] == code and answer["error"].startswith(f"{code}: ")
    await asyncio.sleep(0.05)
    assert harness.graft.take() == []


async def test_unknown_models_and_versions_are_404_and_not_found(harness: Harness, clients: Any) -> None:
    h, g = clients
    x = np.zeros((1, *SMALL), np.float32)
    for model, version in (("mobilenet_v2", ""), ("nope", ""), (MODEL, "2")):
        assert await _status_of(h.infer(model, [http_input(x)], model_version=version)) == "404"
        assert await _status_of(g.infer(model, [grpc_input(x)], model_version=version)) == "StatusCode.NOT_FOUND"
        assert await _status_of(h.get_model_metadata(model, version)) == "404"
        assert await _status_of(g.get_model_metadata(model, version)) == "StatusCode.NOT_FOUND"
        assert await h.is_model_ready(model, version) is False and await g.is_model_ready(model, version) is False
    assert await h.is_model_ready(MODEL, "1") and await g.is_model_ready(MODEL)
    async with aiohttp.ClientSession() as s, s.get(f"http://{harness.http}/v2/no/such/path") as resp:
        assert resp.status == 404 and (await resp.json())["code"] == "NOT_FOUND"
    assert harness.graft.take() == []


# --------------------------------------------------------------------------- waits that end early


async def test_a_stalled_graft_is_a_504_after_the_budget_plus_the_margin(harness: Harness, clients: Any) -> None:
    h, g = clients
    x = np.zeros((1, *SMALL), np.float32)
    async with scripted(harness.graft, lambda req: None):
        started = time.monotonic()
        status = await _status_of(h.infer(MODEL, [http_input(x)], parameters={"budget_ms": 200.0}))
        waited = time.monotonic() - started
        assert status == "504" and 1.1 <= waited < 3.0  # 0.2 s budget + the gateway's 1 s margin
        assert await _status_of(g.infer(MODEL, [grpc_input(x)], parameters={"budget_ms": 200.0})) \
            == "StatusCode.DEADLINE_EXCEEDED"
    assert await metric(harness.metrics_port, "graft_gateway_pending") == 0
    assert await metric(harness.metrics_port, "graft_gateway_requests_total", 'outcome="TIMEOUT",protocol="http"') >= 1


async def test_a_client_that_goes_away_leaves_nothing_pending(harness: Harness, clients: Any) -> None:
    _, g = clients
    x = np.zeros((3, *SMALL), np.float32)
    body = json.dumps({"inputs": [{"name": "cut_13", "shape": [3, 512, 1, 1], "datatype": "FP32", "data": x.ravel().tolist()}],
                       "parameters": {"budget_ms": 30_000.0}})
    async with scripted(harness.graft, lambda req: None):
        # HTTP: the client hangs up after 0.3 s of a 30 s budget.
        async with aiohttp.ClientSession() as s:
            with pytest.raises(TimeoutError):
                await s.post(f"http://{harness.http}/v2/models/{MODEL}/infer", data=body,
                             timeout=aiohttp.ClientTimeout(total=0.3))
        await until_async(lambda: _pending_is(harness, 0), 3, "the gateway to forget the abandoned rows")
        # gRPC: a 0.3 s deadline on a 30 s budget; the gateway stops waiting when the deadline passes.
        started = time.monotonic()
        status = await _status_of(g.infer(MODEL, [grpc_input(x)], parameters={"budget_ms": 30_000.0},
                                          client_timeout=0.3))
        assert status == "StatusCode.DEADLINE_EXCEEDED" and time.monotonic() - started < 2.0
        await until_async(lambda: _pending_is(harness, 0), 3, "the gateway to forget the rows past the deadline")
    assert len(harness.graft.take()) == 6  # the rows were sent; their late replies will find nobody
    assert await metric(harness.metrics_port, "graft_gateway_in_flight", 'protocol="http"') == 0
    assert await metric(harness.metrics_port, "graft_gateway_in_flight", 'protocol="grpc"') == 0


async def _pending_is(harness: Harness, n: int) -> bool:
    return await metric(harness.metrics_port, "graft_gateway_pending") == n


async def test_requests_are_counted_by_protocol_and_outcome(harness: Harness, clients: Any) -> None:
    h, g = clients
    label = 'outcome="ok",protocol="{}"'
    before = [await metric(harness.metrics_port, "graft_gateway_requests_total", label.format(p)) for p in ("http", "grpc")]
    x = np.zeros((1, *SMALL), np.float32)
    await h.infer(MODEL, [http_input(x)])
    await g.infer(MODEL, [grpc_input(x)])
    await g.infer(MODEL, [grpc_input(x)])
    after = [await metric(harness.metrics_port, "graft_gateway_requests_total", label.format(p)) for p in ("http", "grpc")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2]
    assert await metric(harness.metrics_port, "graft_gateway_latency_ms_count", 'protocol="grpc"') >= 2


# ------------------------------------------------------------------------- the benchmarks' submitters


async def test_the_gateway_submitters_answer_like_the_sdk(harness: Harness) -> None:
    from tools.gateway_submit import GrpcSubmitter, HttpSubmitter

    harness.graft.take()
    x = np.full(SMALL, 0.5, np.float32)  # one request's tensor, without a batch dimension
    for sub in (HttpSubmitter(f"http://{harness.http}"), GrpcSubmitter(harness.grpc)):
        try:
            rep = await sub.submit(MODEL, 13, x, budget_ms=300.0, timeout_s=5.0)
            assert rep.ok and rep.tensor is not None and rep.tensor.shape == (1000,)
            np.testing.assert_allclose(rep.tensor, np.full(1000, 256.0))
            assert (rep.server_ms, rep.epoch, rep.group, rep.batch, rep.timings) == (1.5, 1, "g", 1, {"compute_ms": 0.5})
            async with scripted(harness.graft, failing(ErrorCode.OVERLOADED, retry_after_ms=1500)):
                rep = await sub.submit(MODEL, 13, x, budget_ms=300.0, timeout_s=5.0)
            assert not rep.ok and rep.error is not None
            assert (rep.error.code, rep.error.message, rep.error.details) == ("OVERLOADED", "scripted OVERLOADED",
                                                                              {"retry_after_ms": 1500})
            rep = await sub.submit("mobilenet_v2", 13, x, budget_ms=300.0, timeout_s=5.0)
            assert rep.error is not None and rep.error.code == "UNKNOWN_MODEL"
            async with scripted(harness.graft, lambda req: None):
                with pytest.raises(TimeoutError):  # the client's own timeout
                    await sub.submit(MODEL, 13, x, budget_ms=5000.0, timeout_s=0.3)
                with pytest.raises(TimeoutError):  # the gateway's: budget + margin
                    await sub.submit(MODEL, 13, x, budget_ms=50.0, timeout_s=5.0)
            assert [r.budget_ms for r in harness.graft.take()] == [300.0, 300.0, 5000.0, 50.0]
        finally:
            await sub.aclose()
    await until_async(lambda: _pending_is(harness, 0), 3, "nothing pending")

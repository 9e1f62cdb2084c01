"""The gateway in a live system, as ``graft up`` runs it: planner, ingress, worker agent (with its replica
processes) and gateway as child processes on an embedded Redis, at a low resolution, driven by NVIDIA's
tritonclient (``tritonclient.http`` and ``tritonclient.grpc``, the synchronous clients most users have).

Results must equal the SDK path's for the same input; refusals are provoked honestly: a budget the
ingress refuses, one no worker can meet, and a backlog the ingress sheds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from common.client import GraftClient
from common.contract.routing import PlanView
from common.model.zoo import describe
from common.settings import Settings
from common.store.connection import connect
from common.store.plan_store import load_plan
from tests.gateway_helpers import free_port, http_status, write_cpu_profile
from tools.up import System, start_system

RES = 32
MODEL = "resnet18"
CUTS = (0, 4, 8, 13)

pytestmark = [pytest.mark.timeout(150), pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Live:
    system: System
    http: str
    grpc: str
    sdk: GraftClient
    r: Any


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    tmp = tmp_path_factory.mktemp("gateway-live")
    profile = write_cpu_profile(tmp / "cpu.json", (MODEL,), RES)
    hp, gp = free_port(), free_port()
    settings = Settings(models=(MODEL,), resolution=RES, device="cpu", log_level="warning", replan_s=3600.0,
                        gateway_http_port=hp, gateway_grpc_port=gp)
    system = await start_system(settings, profile, log_dir=tmp / "logs",
                                services=("planner", "ingress", "worker", "gateway"))
    r = connect(system.redis_url, settings=settings)
    sdk = GraftClient(system.redis_url, client_id="gateway-live-sdk", default_timeout_s=30.0)
    try:
        deadline = time.monotonic() + 90
        while await http_status(f"http://127.0.0.1:{hp}/v2/health/ready") != 200:
            assert time.monotonic() < deadline, f"the gateway never became ready; see {tmp / 'logs'}"
            await asyncio.sleep(0.1)
        # Up means answering: until a replica has loaded its blocks the ingress sheds (OVERLOADED, retry after …)
        # or the request waits past its budget (DEADLINE_EXCEEDED); then try again.
        while not (warm := await sdk.submit_reply(MODEL, 13, np.zeros((512, 1, 1), np.float32), budget_ms=10_000.0)).ok:
            assert warm.error is not None and warm.error.code in ("OVERLOADED", "DEADLINE_EXCEEDED"), warm.error
            assert time.monotonic() < deadline, f"no replica answered; see {tmp / 'logs'}"
            await asyncio.sleep(min(1.0, warm.error.details.get("retry_after_ms", 100) / 1000.0))
        yield Live(system, f"127.0.0.1:{hp}", f"127.0.0.1:{gp}", sdk, r)
    finally:
        await sdk.close()
        await r.aclose()
        await system.stop()


def http_infer(url: str, x: np.ndarray, cut: int, *, binary: bool = True, model: str = MODEL,
               **kw: Any) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(url, network_timeout=60.0)
    try:
        inp = httpclient.InferInput(f"cut_{cut}", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        return client.infer(model, [inp], outputs=[out], **kw)
    finally:
        client.close()


def grpc_infer(url: str, x: np.ndarray, cut: int, *, model: str = MODEL, **kw: Any) -> grpcclient.InferResult:
    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput(f"cut_{cut}", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], **kw)
    finally:
        client.close()


async def refusal(fn: Any, *args: Any, **kw: Any) -> tuple[str, str]:
    """(status, message) of a call that must fail."""
    with pytest.raises(InferenceServerException) as err:
        await asyncio.to_thread(fn, *args, **kw)
    return str(err.value.status()), str(err.value.message())


async def test_metadata_lists_one_input_per_cut_at_the_served_resolution(live: Live) -> None:
    info = describe(MODEL, RES)
    h = httpclient.InferenceServerClient(live.http)
    g = grpcclient.InferenceServerClient(live.grpc)
    try:
        assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(MODEL)
        assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(MODEL)
        assert not h.is_model_ready("mobilenet_v2") and not g.is_model_ready("mobilenet_v2")
        meta = h.get_model_metadata(MODEL)
        gmeta = g.get_model_metadata(MODEL, as_json=True)
        server = h.get_server_metadata()
    finally:
        h.close()
        g.close()
    want = [{"name": f"cut_{c}", "datatype": "FP32", "shape": [-1, *info.cut_shape(c)]} for c in info.cuts]
    assert meta["inputs"] == want and meta["inputs"][0]["shape"] == [-1, 3, RES, RES]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in gmeta["inputs"]] == [(t["name"], t["shape"]) for t in want]
    assert gmeta["outputs"][0]["name"] == "logits" and server["name"] == "graft"
    assert "binary_tensor_data" in server["extensions"]


async def test_every_path_gives_the_sdks_results_at_several_cuts_and_batch_sizes(live: Live) -> None:
    info = describe(MODEL, RES)
    rng = np.random.default_rng(5)
    for cut in CUTS:
        x = rng.standard_normal((3, *info.cut_shape(cut))).astype(np.float32)
        replies = await asyncio.gather(*(live.sdk.submit_reply(MODEL, cut, row, budget_ms=5000.0) for row in x))
        assert all(rep.ok for rep in replies), [rep.error for rep in replies]
        want = np.stack([rep.tensor for rep in replies])
        binary, as_json, rpc = await asyncio.gather(
            asyncio.to_thread(http_infer, live.http, x, cut, parameters={"budget_ms": 5000.0}),
            asyncio.to_thread(http_infer, live.http, x, cut, binary=False, parameters={"budget_ms": 5000.0}),
            asyncio.to_thread(grpc_infer, live.grpc, x, cut, parameters={"budget_ms": 5000.0}))
        for res in (binary, as_json, rpc):
            out = res.as_numpy("logits")
            assert out.shape == (3, 1000)
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
        params = binary.get_response()["parameters"]
        view = PlanView((await load_plan(live.r)).raw)  # type: ignore[union-attr]
        assert params["epoch"] == view.epoch and params["group"] in view.groups
        assert params["server_ms"] > 0 and params["batch"] >= 1 and len(json.loads(params["rows"])) == 3
    single = await asyncio.to_thread(grpc_infer, live.grpc, np.zeros((1, 512, 1, 1), np.float32), 13)
    timings = json.loads(single.get_response().parameters["timings"].string_param)
    assert timings["compute_ms"] >= 0  # one row: where its server time went


async def test_refusals_of_the_live_system_map_to_400_and_504(live: Live) -> None:
    x = np.zeros((1, 512, 1, 1), np.float32)
    # A budget beyond GRAFT_MAX_SLO_MS: the ingress refuses it (INVALID_REQUEST).
    status, msg = await refusal(http_infer, live.http, x, 13, parameters={"budget_ms": 1e9})
    assert status == "400" and msg.startswith("INVALID_REQUEST: ")
    status, msg = await refusal(grpc_infer, live.grpc, x, 13, parameters={"budget_ms": 1e9})
    assert status == "StatusCode.INVALID_ARGUMENT" and msg.startswith("INVALID_REQUEST: ")
    # A budget of half a millisecond: no replica can meet it, Graft answers DEADLINE_EXCEEDED.
    status, msg = await refusal(http_infer, live.http, x, 13, parameters={"budget_ms": 0.5})
    assert status == "504" and msg.startswith("DEADLINE_EXCEEDED: ")
    status, msg = await refusal(grpc_infer, live.grpc, x, 13, timeout=500)  # the timeout extension: 500 µs
    assert status == "StatusCode.DEADLINE_EXCEEDED" and msg.startswith("DEADLINE_EXCEEDED: ")
    # Names the metadata does not list, and models the plan does not serve.
    status, msg = await refusal(http_infer, live.http, x, 14)
    assert status == "400" and "unknown input 'cut_14'" in msg
    status, _ = await refusal(grpc_infer, live.grpc, x, 13, model="mobilenet_v2")
    assert status == "StatusCode.NOT_FOUND"
    status, _ = await refusal(http_infer, live.http, x, 13, model="mobilenet_v2")
    assert status == "404"


async def test_a_backlog_the_ingress_sheds_is_429_with_retry_after(live: Live) -> None:
    info = describe(MODEL, RES)
    view = PlanView((await load_plan(live.r)).raw)  # type: ignore[union-attr]
    streams = list(view.streams().values())
    before = sum([await live.r.xlen(s) for s in streams])
    # 400 rows at cut 0 with a lax budget queue up behind the one replica...
    burst = np.random.default_rng(1).standard_normal((400, *info.cut_shape(0))).astype(np.float32)
    big = asyncio.create_task(asyncio.to_thread(http_infer, live.http, burst, 0, parameters={"budget_ms": 50_000.0}))
    deadline = time.monotonic() + 30
    while sum([await live.r.xlen(s) for s in streams]) < before + 300:
        assert time.monotonic() < deadline and not big.done(), "the burst never reached the group streams"
        await asyncio.sleep(0.01)
    # ...so a request with a tight budget would only wait and miss: the ingress sheds it. (Tight, not
    # impossible: 200 ms leaves the gateway's and ingress's own time under the burst and still covers a
    # lone run, 11 ms, so the refusal is the backlog's, OVERLOADED, not DEADLINE_EXCEEDED.)
    x = np.zeros((1, *info.cut_shape(0)), np.float32)
    body = json.dumps({"inputs": [{"name": "cut_0", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], "parameters": {"budget_ms": 200.0}})
    async with aiohttp.ClientSession() as s, s.post(f"http://{live.http}/v2/models/{MODEL}/infer", data=body) as resp:
        status, answer, retry_after = resp.status, await resp.json(), resp.headers.get("Retry-After")
    grpc_status, grpc_msg = await refusal(grpc_infer, live.grpc, x, 0, parameters={"budget_ms": 200.0})
    assert status == 429 and answer["code"] == "OVERLOADED", answer
    retry_ms = answer["details"]["retry_after_ms"]
    assert retry_after == str(max(1, -(-retry_ms // 1000)))  # seconds, rounded up
    assert grpc_status == "StatusCode.RESOURCE_EXHAUSTED" and grpc_msg.startswith("OVERLOADED: ")
    result = await asyncio.wait_for(big, 60)  # and the backlog itself is served, every row
    assert result.as_numpy("logits").shape == (400, 1000)

"""Submitting through the gateway, for load generators and benchmarks: the SDK's ``submit_reply`` contract
over the Open Inference Protocol, with NVIDIA's asyncio clients (``tritonclient.http.aio``, binary
tensors both ways, and ``tritonclient.grpc.aio``).

    sub = HttpSubmitter("localhost:8000")          # or GrpcSubmitter("localhost:8001")
    reply = await sub.submit("resnet18", 13, x, budget_ms=200.0, timeout_s=5.0)   # x: one request's tensor
    await sub.aclose()

``submit`` sends ``x`` as a batch of one (``cut_{cut}``, FP32, ``budget_ms`` as a request parameter) and
returns a ``common.contract.wire.Reply`` like ``GraftClient.submit_reply``: ``ok`` with the output row and
``server_ms``/``epoch``/``group``/``batch``/``timings`` read from the response parameters, or ``ok=False``
with the Graft error code the gateway answered (the ``CODE: message`` prefix of its error; its own
``NOT_FOUND`` becomes ``UNKNOWN_MODEL`` and ``UNAVAILABLE`` stays as it is). Like the SDK it raises
``TimeoutError`` when no answer came within ``timeout_s`` (and for the gateway's own ``TIMEOUT``).
Needs the ``test`` extra (``tritonclient[http,grpc]``).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt

from common.client.sdk import as_request_tensor
from common.contract import wire

_CODE = re.compile(r"^([A-Z_]+): (.*)$", re.DOTALL)
_RETRY = re.compile(r"\(retry_after_ms=(\d+)\)\s*$")
_BY_HTTP = {400: "INVALID_REQUEST", 404: "UNKNOWN_MODEL", 429: "OVERLOADED", 503: "UNAVAILABLE",
            504: "DEADLINE_EXCEEDED"}
_BY_GRPC = {"INVALID_ARGUMENT": "INVALID_REQUEST", "NOT_FOUND": "UNKNOWN_MODEL", "RESOURCE_EXHAUSTED": "OVERLOADED",
            "UNAVAILABLE": "UNAVAILABLE", "DEADLINE_EXCEEDED": "DEADLINE_EXCEEDED"}


def _host_port(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def error_reply(req_id: str, message: str, fallback_code: str) -> wire.Reply:
    """The Reply of a gateway error whose text is ``message`` (``CODE: message``, else ``fallback_code``)."""
    m = _CODE.match(message)
    code, text = (m.group(1), m.group(2)) if m else (fallback_code, message)
    if code == "TIMEOUT":
        raise TimeoutError(f"the gateway gave up waiting for {req_id}: {text}")
    code = {"NOT_FOUND": "UNKNOWN_MODEL"}.get(code, code)
    details: dict[str, Any] = {}
    retry = _RETRY.search(text)
    if retry:
        details["retry_after_ms"] = int(retry.group(1))
        text = text[:retry.start()].rstrip()
    return wire.Reply(req_id=req_id, ok=False, error=wire.ErrorInfo(code, text, details))


def reply_of(req_id: str, output: npt.NDArray[Any], params: dict[str, Any]) -> wire.Reply:
    timings = params.get("timings")
    return wire.Reply(
        req_id=req_id, ok=True, tensor=np.asarray(output[0]), server_ms=float(params.get("server_ms", 0.0)),
        epoch=int(params["epoch"]) if "epoch" in params else None, group=params.get("group"),
        batch=int(params["batch"]) if "batch" in params else None,
        timings=json.loads(timings) if isinstance(timings, str) else None)


class HttpSubmitter:
    """Requests over HTTP/REST with binary tensors in and out (``url``: ``host:port``, a scheme is dropped)."""

    def __init__(self, url: str, *, conn_limit: int = 256) -> None:
        import tritonclient.http as httpclient
        import tritonclient.http.aio as httpaio

        self._http = httpclient
        self._client = httpaio.InferenceServerClient(_host_port(url), conn_limit=conn_limit)

    async def submit(self, model: str, cut: int, tensor: Any, *, budget_ms: float, timeout_s: float) -> wire.Reply:
        from tritonclient.utils import InferenceServerException

        x = as_request_tensor(tensor)[None]
        inp = self._http.InferInput(f"cut_{cut}", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = self._http.InferRequestedOutput("logits", binary_data=True)
        rid = uuid.uuid4().hex
        try:
            res = await asyncio.wait_for(self._client.infer(model, [inp], outputs=[out], request_id=rid,
                                                            parameters={"budget_ms": budget_ms}), timeout_s)
        except InferenceServerException as exc:
            status = int(exc.status()) if str(exc.status()).isdigit() else 500
            return error_reply(rid, str(exc.message()), _BY_HTTP.get(status, "INTERNAL"))
        return reply_of(rid, res.as_numpy("logits"), res.get_response().get("parameters") or {})

    async def aclose(self) -> None:
        await self._client.close()


class GrpcSubmitter:
    """Requests over gRPC (``url``: ``host:port``); ``timeout_s`` is also the call's gRPC deadline."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as grpcaio

        self._grpc = grpcclient
        self._client = grpcaio.InferenceServerClient(_host_port(url))

    async def submit(self, model: str, cut: int, tensor: Any, *, budget_ms: float, timeout_s: float) -> wire.Reply:
        from tritonclient.utils import InferenceServerException

        x = as_request_tensor(tensor)[None]
        inp = self._grpc.InferInput(f"cut_{cut}", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        rid = uuid.uuid4().hex
        try:
            res = await asyncio.wait_for(self._client.infer(model, [inp], request_id=rid, client_timeout=timeout_s,
                                                            parameters={"budget_ms": budget_ms}), timeout_s + 0.5)
        except InferenceServerException as exc:
            status = str(exc.status()).removeprefix("StatusCode.")
            message = str(exc.message())
            if status == "DEADLINE_EXCEEDED" and not _CODE.match(message):  # the call's own deadline passed
                raise TimeoutError(f"no answer to {rid} within {timeout_s}s") from None
            return error_reply(rid, message, _BY_GRPC.get(status, "INTERNAL"))
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in res.get_response().parameters.items()
                  if v.WhichOneof("parameter_choice")}
        return reply_of(rid, res.as_numpy("logits"), params)

    async def aclose(self) -> None:
        await self._client.close()

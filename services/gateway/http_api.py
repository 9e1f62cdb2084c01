"""OIP v2 over HTTP/REST on aiohttp: health, metadata and inference endpoints of one ``FrontDoor``.

Every error is ``{"error": "CODE: message", "code": CODE, "details": {...}}`` with the status of
``mapping.HTTP_STATUS`` (OIP asks for the ``error`` string; ``code`` and ``details`` are Graft's
additions); ``429`` carries ``Retry-After``. The runner cancels a handler whose client disconnected
(``handler_cancellation``), which cancels the rows' waits in the front door.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from common import logs
from services.gateway.frontdoor import FrontDoor
from services.gateway.http_codec import (
    BINARY_TYPE,
    HEADER_LENGTH,
    JSON_TYPE,
    encode_infer,
    parse_infer,
    split_body,
)
from services.gateway.mapping import NOT_FOUND, GatewayError, invalid

log = logs.get_logger("graft.gateway")

PROTOCOL = "http"
BODY_SLACK_BYTES = 1 << 20  # JSON around the tensor bytes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps(obj, separators=(",", ":"), default=str).encode()
    return web.Response(body=body, status=status, content_type=JSON_TYPE, headers=headers)


def error_response(exc: GatewayError) -> web.Response:
    headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    return _json({"error": exc.text(), "code": exc.code, "details": exc.details}, exc.http_status, headers)


def answering(handler: Handler) -> Handler:
    """Turn a handler's refusals into OIP error responses (a decorator, not an aiohttp middleware: that
    costs some 20 µs of CPU per request here, a tenth of a small inference's time in the gateway)."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as exc:
            return error_response(exc)
        except Exception as exc:  # a fault of the gateway itself: a 500 the client can read, the trace in the log
            log.exception("gateway_request_failed", path=request.path)
            return error_response(GatewayError("INTERNAL", f"gateway fault: {type(exc).__name__}: {exc}"))
    return wrapped


async def _no_such_path(request: web.Request) -> web.Response:
    return _json({"error": f"NOT_FOUND: no endpoint {request.method} {request.path}", "code": NOT_FOUND,
                  "details": {}}, 404)


class HttpApi:
    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.max_body_bytes = door.settings.max_tensor_bytes + BODY_SLACK_BYTES
        self.app = web.Application(client_max_size=self.max_body_bytes)

        def add(method: str, path: str, handler: Handler) -> None:
            self.app.router.add_route(method, path, answering(handler))

        add("GET", "/v2/health/live", self.live)
        add("GET", "/v2/health/ready", self.ready)
        add("GET", "/v2", self.server_metadata)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            add("GET", base, self.model_metadata)
            add("GET", base + "/ready", self.model_ready)
            add("POST", base + "/infer", self.infer)
        self.app.router.add_route("*", "/{path:.*}", _no_such_path)  # JSON, like every other error
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=1024)
        self.port = int(sock.getsockname()[1])
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=1024).start()
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, lets requests in flight finish (5 s at most)
            self._runner = None

    # ------------------------------------------------------------------------------------- health

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self.door.ready:
            return web.Response(status=200)
        return _json({"error": "not ready: no published plan serves a model yet"}, 400)

    # ----------------------------------------------------------------------------------- metadata

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(self.door.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        info = request.match_info
        return _json(self.door.signature(info["model"], info.get("version", "")).metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        info = request.match_info
        self.door.signature(info["model"], info.get("version", ""))  # 404 for a model the plan does not serve
        return web.Response(status=200)

    # ---------------------------------------------------------------------------------- inference

    async def infer(self, request: web.Request) -> web.Response:
        info = request.match_info
        model, version = info["model"], info.get("version", "")
        with self.door.tracked(PROTOCOL):
            self.door.signature(model, version)  # an unknown model (or no plan) is refused before the body is read
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise invalid(f"request body over the limit of {self.max_body_bytes} bytes (GRAFT_MAX_TENSOR_BYTES "
                              f"plus {BODY_SLACK_BYTES} for JSON)") from None
            header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
            call, binary_out = parse_infer(model, version, header, binary)
            ans = await self.door.infer(call)
            payload, head_len = encode_infer(model, header.get("id"), ans, binary_out)
        if head_len is None:
            return web.Response(body=payload, content_type=JSON_TYPE)
        return web.Response(body=payload, content_type=BINARY_TYPE, headers={HEADER_LENGTH: str(head_len)})


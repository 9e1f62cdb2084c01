"""Prometheus metrics and the health endpoint every service exposes.

One small asyncio HTTP server per service answers ``GET /metrics`` (Prometheus text format),
``GET /healthz`` (liveness: the event loop answers) and ``GET /readyz`` (readiness: the service's own
check, e.g. connected to Redis and holding a plan). Metric names are defined here once, so dashboards
see the same names from every service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

_MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

REQUESTS = Counter("graft_requests_total", "Requests by service and outcome (ok, or an error code)",
                   ["service", "outcome"], registry=REGISTRY)
SLO = Counter("graft_slo_total", "Replied requests by whether they met their deadline",
              ["group", "met"], registry=REGISTRY)
BATCH_SIZE = Histogram("graft_batch_size", "Requests per executed batch", ["group"],
                       buckets=(1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
STAGE_MS = Histogram("graft_stage_ms", "Latency of a pipeline stage in ms", ["stage"],
                     buckets=_MS_BUCKETS, registry=REGISTRY)
QUEUE_LAG = Gauge("graft_queue_lag", "Entries waiting in a group stream (lag + pending)", ["group"],
                  registry=REGISTRY)
PLAN_EPOCH = Gauge("graft_plan_epoch", "Epoch of the plan this service runs", ["service"], registry=REGISTRY)
PLAN_UNPLACED = Gauge("graft_plan_unplaced_replicas",
                      "Replicas the current plan places on devices no live worker agent hosts (planner)",
                      registry=REGISTRY)
LATENCY_SCALE = Gauge("graft_latency_scale",
                      "Factor the planner multiplies a model's profile latencies by, from what replicas measure",
                      ["model"], registry=REGISTRY)
REPLICAS = Gauge("graft_replicas", "Replica processes running on this agent", ["device"], registry=REGISTRY)
RECLAIMED = Counter("graft_reclaimed_total", "Entries reclaimed from dead consumers", ["group"],
                    registry=REGISTRY)
SWEPT = Counter("graft_swept_total",
                "Entries of abandoned retired group streams handled by the planner's sweeper, by outcome "
                "(rerouted, taken, expired, unknown_model, bad_cut, malformed, poison, gone)",
                ["outcome"], registry=REGISTRY)
DEAD_LETTERS = Counter("graft_dead_letters_total", "Entries moved to a dead-letter stream", ["stream"],
                       registry=REGISTRY)

ReadyCheck = Callable[[], Awaitable[bool]]


class HealthServer:
    """Serves /metrics, /healthz and /readyz on 127.0.0.1 (or ``host``: services pass
    ``GRAFT_METRICS_HOST``, 0.0.0.0 to be scraped from another container); port 0 picks a free port."""

    def __init__(self, ready: ReadyCheck, *, host: str = "127.0.0.1", port: int = 0,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self._ready = ready
        self._host, self._port = host, port
        self._registry = registry
        self._server: asyncio.base_events.Server | None = None

    @property
    def host(self) -> str:
        """The address the server is bound to (of its first socket)."""
        if self._server is None:
            raise RuntimeError("health server not started")
        host: str = self._server.sockets[0].getsockname()[0]
        return host

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("health server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> HealthServer:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
            elif path.startswith("/healthz"):
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path.startswith("/readyz"):
                ok = await self._safe_ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _safe_ready(self) -> bool:
        try:
            return bool(await self._ready())
        except Exception:
            return False


async def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Minimal GET used by health checks and tests (no HTTP client dependency for one line)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body

# Gateway (services.gateway): the Open Inference Protocol front door.
GATEWAY_REQUESTS = Counter("graft_gateway_requests_total",
                           "Gateway inference requests by protocol (http, grpc) and outcome (ok, or the code answered)",
                           ["protocol", "outcome"], registry=REGISTRY)
GATEWAY_LATENCY_MS = Histogram("graft_gateway_latency_ms",
                               "Gateway inference latency in ms, from the parsed request to its answer",
                               ["protocol"], buckets=_MS_BUCKETS, registry=REGISTRY)
GATEWAY_IN_FLIGHT = Gauge("graft_gateway_in_flight", "Inference requests the gateway is answering now",
                          ["protocol"], registry=REGISTRY)
GATEWAY_PENDING = Gauge("graft_gateway_pending",
                        "Graft requests (one per row) whose replies the gateway's SDK client awaits", registry=REGISTRY)

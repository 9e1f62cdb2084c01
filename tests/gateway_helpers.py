"""Helpers of the gateway tests: free ports, a small CPU profile, fixed plans, a scripted stand-in for Graft."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from common.contract import keys, wire
from common.metrics import http_get
from common.model.zoo import describe
from common.profiles import make_profile

Script = Callable[[wire.Request], wire.Reply | None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_cpu_profile(path: Path, models: tuple[str, ...], resolution: int) -> Path:
    """A made-up CPU profile (one thread; batches 1-8) of real zoo models: the planner plans from it,
    replicas run the real blocks. Latencies follow FLOPs, about 4 ms for a whole model at batch 1."""
    entries: dict[str, Any] = {}
    for name in models:
        info = describe(name, resolution)
        total = max(1, info.total_flops)
        blocks = []
        for b in info.blocks:
            base = 0.05 + 4.0 * b.flops / total
            blocks.append({"name": b.name, "out_bytes": b.out_bytes, "flops": b.flops,
                           "latency_ms": [[round(base * (0.5 + 0.5 * n), 4)] for n in (1, 2, 4, 8)]})
        entries[name] = {"input_shape": list(info.input_shape), "input_bytes": info.input_bytes, "blocks": blocks}
    make_profile("measured", "cpu-test", "cpu_threads", [1, 2, 4, 8], [1], entries).save(path)
    return path


def fixed_plan(epoch: int, model: str, cuts: list[int], batch: int = 8) -> dict[str, Any]:
    """A plan with one group of ``model`` serving ``cuts`` (and every cut above the first), one replica."""
    group = {"id": "g", "model": model, "fragments": [[model, c] for c in cuts], "cuts": cuts, "batch": batch,
             "share": 1, "replicas": 1, "latency_ms": 10.0, "rate_rps": 50.0, "min_budget_ms": 100.0}
    return {"epoch": epoch, "policy": "test", "profile": None, "rho": 0.9, "groups": [group], "infeasible": [],
            "placement": [{"device": "cpu0", "replicas": [{"group": "g", "share": 1}]}], "total_share": 1,
            "gpus": 0, "routes": {}}


async def until_async(cond: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.05) -> Any:
    """Await ``cond()`` (a coroutine function) until it is truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = await cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(poll_s)


async def http_status(url: str) -> int:
    """Status of ``GET url``; 0 when nothing listens yet."""
    try:
        async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return 0


async def metric(port: int, name: str, labels: str = "") -> float:
    """One sample of the gateway's /metrics (its health server), e.g. ``graft_gateway_pending``."""
    status, body = await http_get("127.0.0.1", port, "/metrics")
    assert status == 200
    want = f"{name}{{{labels}}}" if labels else name
    for line in body.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def echo_sum(req: wire.Request) -> wire.Reply:
    """What the scripted Graft answers by default: 1000 copies of the row's sum (so rows can be told apart)."""
    assert req.tensor is not None
    return wire.Reply.result(req.req_id, np.full(1000, float(req.tensor.sum()), np.float32), server_ms=1.5,
                             epoch=1, group="g", batch=1, timings={"compute_ms": 0.5})


class ScriptedGraft:
    """Stands in for ingress and workers on a real Redis: reads ``graft:ingress`` and answers each request
    as ``script`` says (``None``: never — a stalled system). It sees exactly what the gateway sent."""

    def __init__(self, r: Any) -> None:
        self.r = r
        self.script: Script = echo_sum
        self.seen: list[wire.Request] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ScriptedGraft:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)

    async def _run(self) -> None:
        last = "0-0"
        while not self._stop.is_set():
            resp = await self.r.xread({keys.INGRESS: last}, count=500, block=50)
            for _stream, rows in resp or []:
                for raw_id, fields in rows:
                    last = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                    req = wire.decode_request(fields[keys.FIELD])
                    if req.tensor is None and req.blob is not None and req.blob_meta is not None:
                        req.tensor = wire.decode_blob(req.blob_meta, await self.r.get(req.blob), req.blob)
                    self.seen.append(req)
                    rep = self.script(req)
                    if rep is not None:
                        await self.r.xadd(keys.reply_stream(req.client), {keys.FIELD: wire.encode_reply(rep)})

    def take(self) -> list[wire.Request]:
        seen, self.seen = self.seen, []
        return seen


@contextlib.asynccontextmanager
async def scripted(graft: ScriptedGraft, script: Script) -> Any:
    graft.script = script
    try:
        yield graft
    finally:
        graft.script = echo_sum

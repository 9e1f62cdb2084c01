"""Helpers of the worker tests: plans, requests as the ingress writes them, raw replies, stand-in replicas."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.contract import keys, wire
from common.store.registry import Registry
from tests.helpers import run_blocks

CLIENT = "client-1"


def group(gid: str, model: str, cuts: Sequence[int] = (0,), *, batch: int = 4, share: int = 1,
          latency_ms: float = 20.0, replicas: int = 1) -> dict[str, Any]:
    return {"id": gid, "model": model, "fragments": [[model, c] for c in cuts], "cuts": list(cuts), "batch": batch,
            "share": share, "replicas": replicas, "latency_ms": latency_ms, "rate_rps": 10.0, "min_budget_ms": 100.0}


def plan(epoch: int, groups: Sequence[dict[str, Any]],
         placement: Sequence[tuple[str, str, int]]) -> dict[str, Any]:
    """A plan of ``groups`` with ``placement`` given as (device, group id, share) per replica."""
    devices: dict[str, list[dict[str, Any]]] = {}
    for device, gid, share in placement:
        devices.setdefault(device, []).append({"group": gid, "share": share})
    return {"epoch": epoch, "policy": "test", "profile": None, "rho": 0.9, "groups": list(groups), "infeasible": [],
            "placement": [{"device": d, "replicas": reps} for d, reps in devices.items()],
            "total_share": sum(s for _, _, s in placement), "gpus": 0, "routes": {}}


def sample(seed: int, res: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, res, res)).astype(np.float32)


def request(blocks: list[torch.nn.Module], model: str, req_id: str, cut: int, seed: int, *, res: int,
            budget_ms: float = 5000.0, age_s: float = 0.0, client: str = CLIENT,
            source: str | None = None) -> tuple[bytes, np.ndarray]:
    """The entry the ingress writes for a device that ran blocks 0..cut-1, and the whole model's output."""
    x = sample(seed, res)
    received = time.time() - age_s
    req = wire.Request(req_id=req_id, client=client, model=model, cut=cut, tensor=run_blocks(blocks, x, 0, cut),
                       budget_ms=budget_ms, received=received, deadline=received + budget_ms / 1000.0,
                       source=source or f"{req_id}-src")
    return wire.encode_request(req), run_blocks(blocks, x, 0, len(blocks))


def blob_request(blocks: list[torch.nn.Module], model: str, req_id: str, cut: int, seed: int, *, res: int,
                 budget_ms: float = 5000.0, age_s: float = 0.0) -> tuple[bytes, bytes, np.ndarray]:
    """Like ``request``, with the tensor in a blob: the entry, the blob's bytes, the expected output."""
    x = sample(seed, res)
    received = time.time() - age_s
    meta, data = wire.tensor_bytes(run_blocks(blocks, x, 0, cut))
    req = wire.Request(req_id=req_id, client=CLIENT, model=model, cut=cut, tensor=None, budget_ms=budget_ms,
                       received=received, deadline=received + budget_ms / 1000.0, blob=keys.blob(req_id),
                       blob_meta=meta, source=f"{req_id}-src")
    return wire.encode_request(req), data, run_blocks(blocks, x, 0, len(blocks))


async def put(r: Any, stream: str, payloads: Sequence[bytes]) -> list[str]:
    """XADD atomically (MULTI), so a blocked reader sees the whole burst at once."""
    async with r.pipeline(transaction=True) as pipe:
        for p in payloads:
            pipe.xadd(stream, {keys.FIELD: p})
        ids = await pipe.execute()
    return [i.decode() for i in ids]


async def put_blobs(r: Any, blobs: dict[str, bytes]) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for req_id, data in blobs.items():
            pipe.set(keys.blob(req_id), data, px=60_000)
        await pipe.execute()


async def raw_replies(r: Any, client: str = CLIENT) -> list[wire.Reply]:
    """Every reply in ``client``'s reply stream, in order (duplicates included: nothing is deduplicated here)."""
    rows = await r.xrange(keys.reply_stream(client), "-", "+")
    return [wire.decode_reply(fields[keys.FIELD]) for _id, fields in rows]


async def replies(r: Any, n: int, timeout: float = 20.0, client: str = CLIENT) -> dict[str, wire.Reply]:
    """Wait for ``n`` distinct replies; every req_id must be answered exactly once."""
    deadline = time.monotonic() + timeout
    while True:
        got = await raw_replies(r, client)
        counts = Counter(rep.req_id for rep in got)
        dup = {k: v for k, v in counts.items() if v > 1}
        assert not dup, f"answered more than once: {dup}"
        if len(counts) >= n:
            return {rep.req_id: rep for rep in got}
        assert time.monotonic() < deadline, f"only {len(counts)} of {n} replies arrived"
        await asyncio.sleep(0.02)


async def live_replicas(r: Any) -> dict[str, dict[str, Any]]:
    return await Registry(r, keys.REPLICA_KIND, 2.0).live()


async def readers(r: Any, stream: str) -> list[str]:
    """Live serving replicas (registry names) that say they read ``stream``."""
    return sorted(n for n, s in (await live_replicas(r)).items()
                  if s.get("state") == "serving" and stream in (s.get("streams") or []))


@contextlib.asynccontextmanager
async def ingress_at(r: Any, epoch: int | None, name: str = "ingress-test") -> AsyncIterator[dict[str, Any]]:
    """An ingress in the registry routing by ``epoch`` (change ``status["epoch"]`` to move it on)."""
    registry = Registry(r, keys.INGRESS_KIND, 5.0)
    status: dict[str, Any] = {"epoch": epoch}

    async def beat() -> None:
        while True:
            await registry.beat(name, status)
            await asyncio.sleep(0.1)

    await registry.beat(name, status)
    task = asyncio.create_task(beat())
    try:
        yield status
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registry.leave(name)


async def until_async(cond: Callable[[], Awaitable[Any]], timeout: float, what: str, *,
                      poll_s: float = 0.02) -> None:
    """``until`` for a condition that has to ask Redis."""
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(poll_s)


def fake_python(tmp_path: Path, name: str = "python", **env: str) -> str:
    """An interpreter for the agent that runs ``tests.fake_replica`` instead of ``services.worker.replica``
    (the agent calls ``PYTHON -m services.worker.replica ARGS``), with ``env`` added. The knobs that make
    a process fail at once (see ``tests.fake_replica``) act here, before Python starts: as fast as a
    process can die."""
    exports = "".join(f"export {k}='{v}'\n" for k, v in env.items())
    path = tmp_path / name
    path.write_text(
        f"#!/bin/sh\n{exports}"
        'if [ -n "$FAKE_REPLICA_ONCE" ]; then [ -e "$FAKE_REPLICA_ONCE" ] && exit 1; : > "$FAKE_REPLICA_ONCE"; fi\n'
        'if [ -n "$FAKE_REPLICA_EXIT" ] && [ -z "$FAKE_REPLICA_EXIT_AFTER_S" ]; then exit "$FAKE_REPLICA_EXIT"; fi\n'
        f"shift 2\nexec {sys.executable} -m tests.fake_replica \"$@\"\n")
    path.chmod(0o755)
    return str(path)

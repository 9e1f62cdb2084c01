"""Small helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.contract import keys
from common.profiles import Profile, make_profile
from common.store.registry import Registry


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not reaped yet, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def until(cond: Callable[[], Any], timeout: float, what: str, *, poll_s: float = 0.02) -> None:
    """Wait until ``cond()`` is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(poll_s)


def run_blocks(blocks: list[torch.nn.Module], x: np.ndarray, start: int, end: int) -> np.ndarray:
    """Blocks ``start..end-1`` on one request's tensor (batch of one), as a fresh array."""
    with torch.inference_mode():
        h = torch.from_numpy(x)[None]
        for b in blocks[start:end]:
            h = b(h)
    return h[0].numpy().copy()


def cpu_test_profile() -> Profile:
    """A tiny measured-CPU profile: model ``m`` of two blocks, threads 1 and 2, batches 1 and 2."""
    blocks = [{"name": f"b{j}", "out_bytes": 100, "flops": 10**6,
               "latency_ms": [[1.0, 0.6], [1.5, 0.9]]} for j in range(2)]
    return make_profile("measured", "cpu-test", "cpu_threads", [1, 2], [1, 2],
                        {"m": {"input_shape": [3, 8, 8], "input_bytes": 768, "blocks": blocks}})


@contextlib.asynccontextmanager
async def serving_replica(r: Any, *streams: str, name: str = "fake-replica", interval_s: float = 0.3,
                          **status: Any) -> AsyncIterator[None]:
    """A registry entry that says a live replica reads ``streams`` (what a test's fake worker does not
    publish itself): the ingress routes only to streams a live replica reads."""
    registry = Registry(r, keys.REPLICA_KIND, 2.0)
    body = {"state": "serving", "streams": list(streams), **status}
    await registry.beat(name, body)

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval_s)
            await registry.beat(name, body)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registry.leave(name)


class NoRedis:
    """A Redis client that code under test must not use (constructors may register scripts; nothing runs):
    passed where logic is meant to talk to its ``Store`` only."""

    def register_script(self, body: str) -> Any:
        return self._refuse

    def _refuse(self, *args: Any, **kw: Any) -> Any:
        raise AssertionError("Redis used directly, not through the Store")

    def __getattr__(self, name: str) -> Any:
        return self._refuse

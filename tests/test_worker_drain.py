"""Retiring a stream waits for every live ingress to route by a newer plan (make-before-break)."""

from __future__ import annotations

from typing import Any

from common.contract import keys, wire
from services.worker.drain import ingresses_past


async def beat(r: Any, name: str, epoch: int | None) -> None:
    await r.set(keys.health("ingress", name), wire.encode_message("health", {"name": name, "epoch": epoch}), ex=5)


async def test_no_ingress_alive_means_nobody_routes_to_the_old_stream(redis: Any) -> None:
    assert await ingresses_past(redis, 3)


async def test_waits_for_the_slowest_ingress(redis: Any) -> None:
    await beat(redis, "a", 4)
    await beat(redis, "b", 3)  # still routing by epoch 3: its new replicas are not ready yet
    assert not await ingresses_past(redis, 3)
    await beat(redis, "b", 4)
    assert await ingresses_past(redis, 3)
    assert not await ingresses_past(redis, 4)


async def test_garbage_and_planless_heartbeats_do_not_block_a_drain(redis: Any) -> None:
    await redis.set(keys.health("ingress", "junk"), b"\xc1not msgpack", ex=5)
    await beat(redis, "starting", None)  # no plan yet: routes nothing
    await beat(redis, "moved", 7)
    assert await ingresses_past(redis, 6)

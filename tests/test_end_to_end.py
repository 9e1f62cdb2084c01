"""The whole data path with real processes: SDK → ingress → group streams → worker agent → replica
child processes → reply streams. Results must equal local execution of the full model, and a plan
switch under load must lose no reply (make-before-break at the ingress, drain at the replicas)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from common.client.sdk import GraftClient
from common.contract import keys
from common.contract.routing import serving_from
from common.model.zoo import build_blocks
from common.settings import Settings
from common.store.plan_store import publish_plan
from common.store.registry import Registry
from services.ingress.service import IngressService
from services.lifecycle import Heartbeat
from services.worker.agent import Agent
from services.worker.device import Device
from tests.helpers import run_blocks

RES = 32
MODELS = ("resnet18", "mobilenet_v2")
CUTS = {"resnet18": [0, 4, 8], "mobilenet_v2": [0, 6, 12]}

pytestmark = pytest.mark.timeout(180)


def group(gid: str, model: str, cuts: Sequence[int], batch: int = 8) -> dict[str, Any]:
    return {"id": gid, "model": model, "fragments": [[model, c] for c in cuts], "cuts": list(cuts), "batch": batch,
            "share": 1, "replicas": 1, "latency_ms": 20.0, "rate_rps": 20.0, "min_budget_ms": 100.0}


def plan(epoch: int, groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epoch": epoch, "policy": "test", "profile": None, "rho": 0.9, "groups": groups, "infeasible": [],
            "placement": [{"device": "cpu0", "replicas": [{"group": g["id"], "share": 1} for g in groups]}],
            "total_share": len(groups), "gpus": 0, "routes": {}}


EPOCH1 = plan(1, [group("r", "resnet18", CUTS["resnet18"]), group("m", "mobilenet_v2", CUTS["mobilenet_v2"])])
# Epoch 2 re-groups resnet18 (two groups instead of one): every request must still be answered.
EPOCH2 = plan(2, [group("r-lo", "resnet18", [0, 4]), group("r-hi", "resnet18", [8]),
                  group("m", "mobilenet_v2", CUTS["mobilenet_v2"])])


@pytest.fixture(scope="module")
def blocks() -> dict[str, list[torch.nn.Module]]:
    return {m: build_blocks(m, resolution=RES, seed=0) for m in MODELS}


async def serving(r: Any, streams: Sequence[str], timeout: float = 90.0) -> None:
    """Until a live replica reads every one of ``streams`` (it has loaded its model and was assigned)."""
    deadline = time.monotonic() + timeout
    registry = Registry(r, keys.REPLICA_KIND, 2.0)
    while True:
        live = serving_from((await registry.live()).values())
        if all(live.live(s) for s in streams):
            return
        assert time.monotonic() < deadline, f"no live replica reads {[s for s in streams if not live.live(s)]}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def system(redis: Any, redis_url: str) -> AsyncIterator[Agent]:
    settings = Settings(redis_url=redis_url, resolution=RES, models=MODELS, log_level="warning", block_ms=50)
    await publish_plan(redis, EPOCH1)
    status: dict[str, Any] = {}
    ingress = IngressService(redis, settings, name="ingress-e2e", plan_interval_s=0.05, serving_interval_s=0.05,
                             status=status)
    hb = Heartbeat(redis, keys.INGRESS_KIND, "ingress-e2e", interval_s=0.2)
    hb.status = status  # what agents read to know the ingress's epoch (drains wait for it)
    agent = Agent(settings, [Device("cpu", 0)], name="agent-e2e", poll_s=0.05, stop_grace_s=10.0, standby=0)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(ingress.run(stop)), asyncio.create_task(agent.run()),
             asyncio.create_task(hb.run(stop))]
    try:
        await asyncio.wait_for(ingress.ready.wait(), 30)
        await serving(redis, [keys.group_stream(1, "r"), keys.group_stream(1, "m")])
        await asyncio.sleep(0.2)  # the ingress's own registry poll
        yield agent
    finally:
        agent.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def test_results_equal_local_execution_for_several_models_and_cuts(
        system: Agent, redis_url: str, blocks: dict[str, list[torch.nn.Module]]) -> None:
    rng = np.random.default_rng(7)
    cases = [(m, c, rng.standard_normal((3, RES, RES)).astype(np.float32)) for m in MODELS for c in CUTS[m]] * 2
    async with GraftClient(redis_url, client_id="e2e", default_timeout_s=30.0) as client:
        replies = await asyncio.gather(*(
            client.submit_reply(m, c, run_blocks(blocks[m], x, 0, c), budget_ms=20_000.0) for m, c, x in cases))
    for (m, c, x), rep in zip(cases, replies, strict=True):
        assert rep.ok and rep.tensor is not None, (m, c, rep.error)
        np.testing.assert_allclose(rep.tensor, run_blocks(blocks[m], x, 0, len(blocks[m])), rtol=1e-4, atol=1e-5)
        assert rep.epoch == 1 and rep.group == ("r" if m == "resnet18" else "m")
    assert any((rep.batch or 0) > 1 for rep in replies), "concurrent requests were batched"


async def test_blob_tensors_give_the_same_results_and_leave_no_blob(
        system: Agent, redis: Any, redis_url: str, blocks: dict[str, list[torch.nn.Module]]) -> None:
    rng = np.random.default_rng(11)
    cases = [(m, c, rng.standard_normal((3, RES, RES)).astype(np.float32)) for m in MODELS for c in CUTS[m]]
    # Every tensor above 1 byte goes to graft:blob:{req_id}; the replica processes fetch and delete them.
    async with GraftClient(redis_url, client_id="e2e-blob", default_timeout_s=30.0, blob_threshold_bytes=1) as client:
        replies = await asyncio.gather(*(
            client.submit_reply(m, c, run_blocks(blocks[m], x, 0, c), budget_ms=20_000.0) for m, c, x in cases))
    for (m, c, x), rep in zip(cases, replies, strict=True):
        assert rep.ok and rep.tensor is not None, (m, c, rep.error)
        np.testing.assert_allclose(rep.tensor, run_blocks(blocks[m], x, 0, len(blocks[m])), rtol=1e-4, atol=1e-5)
    deadline = time.monotonic() + 5
    while [k async for k in redis.scan_iter(match=keys.blob("*"))]:
        assert time.monotonic() < deadline, "blobs left behind after their replies"
        await asyncio.sleep(0.05)


async def test_plan_switch_under_load_loses_no_reply(
        system: Agent, redis: Any, redis_url: str, blocks: dict[str, list[torch.nn.Module]]) -> None:
    inputs = {(m, c): run_blocks(blocks[m], np.full((3, RES, RES), 0.1, np.float32), 0, c)
              for m in MODELS for c in CUTS[m]}
    sent: list[tuple[str, int]] = []
    got: list[Any] = []
    stop = asyncio.Event()

    async def producer(client: GraftClient, k: int) -> None:
        i = k
        while not stop.is_set():
            m = MODELS[i % 2]
            c = CUTS[m][(i // 2) % 3]
            sent.append((m, c))
            got.append(await client.submit_reply(m, c, inputs[(m, c)], budget_ms=20_000.0))
            i += 4
            await asyncio.sleep(0.01)

    async with GraftClient(redis_url, client_id="e2e-switch", default_timeout_s=60.0) as client:
        producers = [asyncio.create_task(producer(client, k)) for k in range(4)]
        await asyncio.sleep(1.0)
        await publish_plan(redis, EPOCH2)
        deadline = time.monotonic() + 90
        while not any(rep.epoch == 2 for rep in got):
            assert time.monotonic() < deadline, "no request was served by epoch 2"
            assert not any(p.done() for p in producers), [p.exception() for p in producers if p.done()]
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*producers), 60)

    assert len(got) == len(sent) > 20
    failed = [(s, rep.error) for s, rep in zip(sent, got, strict=True) if not rep.ok]
    assert not failed, failed
    epochs = [rep.epoch for rep in got]
    assert set(epochs) == {1, 2}
    assert epochs.index(2) > 0 and all(e == 2 for e in epochs[epochs.index(2) + 8:]), "no flapping back to epoch 1"
    groups2 = {rep.group for rep in got if rep.epoch == 2}
    assert {"r-lo", "r-hi"} & groups2
    # The retired epoch's streams are drained and dropped: every slot serves epoch 2 alone.
    deadline = time.monotonic() + 60
    while not all(s.active is not None and s.active.epoch == 2 and not s.draining for s in system.slots):
        assert time.monotonic() < deadline, "epoch-1 streams never drained"
        await asyncio.sleep(0.1)
    for gid in ("r", "m"):
        for g in await redis.xinfo_groups(keys.group_stream(1, gid)):
            assert g["pending"] == 0

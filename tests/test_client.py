"""The client SDK end to end: SDK → real ingress (in-process) → a fake worker that answers via ReplySender."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from redis.asyncio import Redis

import common.client.sdk
from common.client.sdk import GraftClient
from common.contract import keys, wire
from common.contract.errors import BadCut, BadTensor, DeadlineExceeded, Overloaded
from common.model.zoo import describe
from common.settings import Settings
from common.store.cluster import connection_kwargs
from common.store.plan_store import publish_plan
from common.store.replies import ReplySender
from common.store.streams import ensure_group
from services.ingress.service import IngressService
from tests.helpers import serving_replica, until

RES = 32


def one_group_plan(n_blocks: int) -> dict[str, Any]:
    g = {"id": "all", "model": "resnet18", "fragments": [], "cuts": list(range(n_blocks)), "batch": 8, "share": 100,
         "replicas": 4, "latency_ms": 5.0, "rate_rps": 100.0, "min_budget_ms": 0.0}
    return {"epoch": 1, "policy": "test", "profile": "test", "rho": 0.9, "groups": [g], "infeasible": [],
            "placement": [{"device": "cpu0", "replicas": [{"group": "all", "share": 1}]}], "total_share": 1,
            "gpus": 0, "routes": {}}


async def fake_worker(r: Redis, stop: asyncio.Event) -> None:
    """Answers each request with ``[sum(tensor), cut]``; req_id prefixes pick an error or silence.

    Like a replica, it GETs the blobs of what it read in one pipeline and deletes them with the replies.
    """
    stream = keys.group_stream(1, "all")
    await ensure_group(r, stream, keys.WORKER_GROUP, "0")
    sender = ReplySender(r)
    while not stop.is_set():
        resp = await r.xreadgroup(keys.WORKER_GROUP, "fake-0", {stream: ">"}, count=64, block=20)
        rows = [row for _, rows in resp or [] for row in rows]
        reqs = [wire.decode_request(fields[keys.FIELD]) for _, fields in rows]
        blobbed = [req for req in reqs if req.blob is not None]
        if blobbed:
            async with r.pipeline(transaction=False) as pipe:
                for req in blobbed:
                    pipe.get(req.blob)
                for req, data in zip(blobbed, await pipe.execute(), strict=True):
                    assert req.blob is not None and req.blob_meta is not None
                    req.tensor = wire.decode_blob(req.blob_meta, data, req.blob)
        out: list[tuple[str, wire.Reply]] = []
        for req in reqs:
            assert req.tensor is not None and req.deadline is not None
            if req.req_id.startswith("silent"):
                continue
            if req.req_id.startswith("late"):
                rep = wire.Reply.failure(req.req_id, DeadlineExceeded("the deadline passed in the queue"))
            elif req.req_id.startswith("busy"):
                rep = wire.Reply.failure(req.req_id, Overloaded("replicas saturated", retry_after_ms=123))
            else:
                result = np.array([req.tensor.sum(), req.cut], np.float32)
                rep = wire.Reply.result(req.req_id, result, server_ms=1.5, epoch=1, group="all", batch=len(rows))
            out.append((req.client, rep))
        await sender.send_many(out)
        if rows:
            await r.xack(stream, keys.WORKER_GROUP, *[i for i, _ in rows])
        if blobbed:
            await r.delete(*(req.blob for req in blobbed if req.blob is not None))


async def running_system(redis: Redis, settings: Settings) -> AsyncIterator[None]:
    await publish_plan(redis, one_group_plan(describe("resnet18", settings.resolution or None).n_blocks))
    stop = asyncio.Event()
    ingress = IngressService(redis, settings, name="ingress-c", plan_interval_s=0.05, serving_interval_s=0.05)
    async with serving_replica(redis, keys.group_stream(1, "all")):
        tasks = [asyncio.create_task(ingress.run(stop)), asyncio.create_task(fake_worker(redis, stop))]
        await asyncio.wait_for(ingress.ready.wait(), 10)
        await until(lambda: ingress.serving.live(keys.group_stream(1, "all")), 5, "the ingress seeing the replica")
        yield
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


@pytest.fixture
async def system(redis: Redis, redis_url: str) -> AsyncIterator[None]:
    settings = Settings(redis_url=redis_url, models=("resnet18",), resolution=RES)
    async for _ in running_system(redis, settings):
        yield


@pytest.fixture
async def client(system: None, redis_url: str) -> AsyncIterator[GraftClient]:
    async with GraftClient(redis_url, client_id="test-client", default_timeout_s=5.0) as c:
        yield c


SHAPE = describe("resnet18", RES).cut_shape(4)


async def test_submit_returns_the_result(client: GraftClient) -> None:
    x = np.full(SHAPE, 0.25, np.float32)
    y = await client.submit("resnet18", 4, x, slo_ms=400.0, device_ms=50.0)
    assert y.tolist() == [pytest.approx(x.sum()), 4.0]
    rep = await client.submit_reply("resnet18", 4, torch.ones(SHAPE, dtype=torch.float64), budget_ms=200.0)
    assert rep.ok and rep.epoch == 1 and rep.group == "all" and rep.server_ms == 1.5 and rep.batch is not None
    assert rep.tensor is not None and rep.tensor[0] == pytest.approx(float(np.prod(SHAPE)))
    assert client.in_flight == 0
    # A submit whose XADD timed out fails to its caller; redis-py never re-sends it (tests/test_store.py).
    assert connection_kwargs(client._conn)["retry"]._retries == 0


async def test_error_replies_raise_typed_errors(client: GraftClient) -> None:
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(BadCut):
        await client.submit("resnet18", 99, x, budget_ms=100.0)
    with pytest.raises(BadTensor) as bad:
        await client.submit("resnet18", 4, x[:, :1], budget_ms=100.0)
    assert bad.value.details["expected"] == list(SHAPE)
    with pytest.raises(DeadlineExceeded):
        await client.submit("resnet18", 4, x, budget_ms=100.0, req_id="late-1")
    with pytest.raises(Overloaded) as busy:
        await client.submit("resnet18", 4, x, budget_ms=100.0, req_id="busy-1")
    assert busy.value.retry_after_ms == 123
    rep = await client.submit_reply("resnet18", 4, x, budget_ms=100.0, req_id="late-2")
    assert not rep.ok and rep.error is not None and rep.error.code == "DEADLINE_EXCEEDED"


async def test_timeout_cleans_up_and_late_or_unknown_replies_are_ignored(client: GraftClient, redis: Redis) -> None:
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(TimeoutError):
        await client.submit("resnet18", 4, x, budget_ms=100.0, req_id="silent-1", timeout_s=0.3)
    assert client.in_flight == 0
    # The reply arrives after the submit gave up, plus one nobody asked for and one that is garbage.
    sender = ReplySender(redis)
    await sender.send(client.client_id, wire.Reply.result("silent-1", np.zeros(2, np.float32)))
    await sender.send(client.client_id, wire.Reply.result("ghost", np.zeros(2, np.float32)))
    await redis.xadd(client.reply_stream, {keys.FIELD: b"\x00garbage"})
    y = await client.submit("resnet18", 4, x + 1, budget_ms=100.0)
    assert y[0] == pytest.approx(float(np.prod(SHAPE)))


async def test_many_concurrent_submits(client: GraftClient) -> None:
    xs = [np.full(SHAPE, i, np.float32) for i in range(200)]
    ys = await asyncio.gather(*(client.submit("resnet18", 4, x, budget_ms=5_000.0) for x in xs))
    assert [float(y[0]) for y in ys] == pytest.approx([float(x.sum()) for x in xs])
    assert client.in_flight == 0
    mixed = await client.submit_many("resnet18", 4, [xs[1], xs[2][:1]], budget_ms=5_000.0)
    assert isinstance(mixed[0], np.ndarray) and isinstance(mixed[1], BadTensor)


async def test_client_needs_somewhere_to_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="REDIS_URL"):
        GraftClient()
    with pytest.raises(ValueError, match="client_id"):
        GraftClient("redis://localhost:1", client_id="has space")


async def test_close_fails_waiting_submits(system: None, redis_url: str) -> None:
    c = await GraftClient(redis_url, client_id="closer").start()
    waiting = asyncio.create_task(c.submit("resnet18", 4, np.zeros(SHAPE, np.float32), budget_ms=100.0,
                                           req_id="silent-2"))
    await asyncio.sleep(0.1)
    await c.close()
    with pytest.raises(common.client.sdk.ClientClosed):
        await waiting


async def sent_requests(r: Redis) -> dict[str, wire.Request]:
    """Every request the SDK XADDed to the ingress stream (acked entries stay until trimmed)."""
    return {(req := wire.decode_request(f[keys.FIELD])).req_id: req for _, f in await r.xrange(keys.INGRESS)}


async def test_large_tensors_travel_as_blobs_and_small_ones_inline(system: None, redis: Redis,
                                                                   redis_url: str) -> None:
    big = np.full(SHAPE, 0.5, np.float32)  # 16 KiB
    small = np.full(describe("resnet18", RES).cut_shape(9), 2.0, np.float32)  # 4 KiB
    async with GraftClient(redis_url, client_id="blobby", blob_threshold_bytes=8 * 1024,
                           default_timeout_s=5.0) as c:
        ys = await asyncio.gather(
            *(c.submit("resnet18", 4, big * (i + 1), budget_ms=300.0, req_id=f"big-{i}") for i in range(5)),
            c.submit("resnet18", 9, small, slo_ms=400.0, device_ms=100.0, req_id="small"))
    assert [float(y[0]) for y in ys] == pytest.approx([float((big * (i + 1)).sum()) for i in range(5)]
                                                      + [float(small.sum())])
    assert [float(y[1]) for y in ys] == [4.0] * 5 + [9.0]
    sent = await sent_requests(redis)
    for i in range(5):
        req = sent[f"big-{i}"]
        assert req.tensor is None and req.blob == keys.blob(f"big-{i}")
        assert req.blob_meta == wire.TensorMeta("float32", tuple(SHAPE))
    assert sent["small"].blob is None and sent["small"].tensor is not None
    for _ in range(100):  # each deleted by the worker, right after its reply
        if not [k async for k in redis.scan_iter(match=keys.blob("*"))]:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("blobs left behind after their replies")


async def test_blob_ttl_covers_the_budget_and_the_threshold_can_be_off(system: None, redis: Redis,
                                                                       redis_url: str) -> None:
    x = np.zeros(SHAPE, np.float32)
    c = GraftClient(redis_url, client_id="ttl", blob_threshold_bytes=1024, blob_ttl_margin_ms=700.0)
    out = c._outgoing(wire.Request("r1", "ttl", "resnet18", 4, x, slo_ms=400.0, device_ms=150.0))
    assert out.blob == keys.blob("r1") and out.ttl_ms == 250 + 700 and out.data == x.tobytes()
    assert wire.decode_request(out.payload).blob_meta == wire.TensorMeta("float32", tuple(SHAPE))
    assert c._outgoing(wire.Request("r2", "ttl", "resnet18", 12, x[:8, :1, :1].copy(), budget_ms=9.0)).blob is None
    with pytest.raises(ValueError, match="negative"):
        GraftClient(redis_url, blob_threshold_bytes=-1)
    async with GraftClient(redis_url, client_id="inline", blob_threshold_bytes=0, default_timeout_s=5.0) as off:
        y = await off.submit("resnet18", 4, x + 1, budget_ms=300.0, req_id="off-1")
    assert y[0] == pytest.approx(float(np.prod(SHAPE)))
    assert (await sent_requests(redis))["off-1"].blob is None


def readme_snippet() -> str:
    doc = common.client.sdk.__doc__ or ""
    block = doc.split("Used from a plain script::", 1)[1].split("One background task", 1)[0]
    return "\n".join(line[4:] for line in block.splitlines()).strip() + "\n"


def test_readme_shows_the_sdk_snippet_unchanged() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert readme_snippet() in blocks, "README's SDK example drifted from common/client.py's docstring"


@pytest.fixture
async def full_size_system(redis: Redis, redis_url: str) -> AsyncIterator[None]:
    async for _ in running_system(redis, Settings(redis_url=redis_url, models=("resnet18",))):
        yield


async def test_readme_snippet_runs_as_a_plain_script(full_size_system: None, redis: Redis, redis_url: str,
                                                      tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(readme_snippet())
    env = {**os.environ, "REDIS_URL": redis_url}
    # In a thread: the event loop keeps serving the ingress and the worker the script talks to.
    root = Path(__file__).resolve().parents[1]  # noqa: ASYNC240
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], env=env, cwd=root,
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"class \d+\n", proc.stdout)
    # A 3x224x224 float32 input is 588 KiB: over the default threshold, it went as a blob.
    (req,) = (await sent_requests(redis)).values()
    assert req.tensor is None and req.blob is not None and req.blob_meta is not None
    assert req.blob_meta.nbytes == 3 * 224 * 224 * 4

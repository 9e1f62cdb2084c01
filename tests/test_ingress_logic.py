"""The ingress's batch logic on the in-memory store, no Redis: what each entry becomes (routed, answered,
dead-lettered), what is acknowledged, and what a store failure does. The Redis client it is given
refuses every use, so these tests also prove the batch path talks to nothing but its ``Store``."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest

from common.contract import keys, wire
from common.contract.errors import StoreUnavailable
from common.contract.routing import PlanView, serving_from
from common.settings import Settings
from common.store.memory import MemoryStore
from services.ingress.service import IngressService
from tests.helpers import NoRedis
from tests.test_ingress_service import INFO, PLAN, RES, request

G0, G1 = keys.group_stream(1, "g0"), keys.group_stream(1, "g1")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def ingress(store: MemoryStore) -> IngressService:
    settings = Settings(redis_url="redis://unused", models=("resnet18",), resolution=RES, max_slo_ms=10_000.0)
    service = IngressService(NoRedis(), settings, name="ingress-u", store=store)
    service._switch(PlanView(PLAN))
    service.serving = serving_from([{"state": "serving", "streams": [G0, G1]}])
    return service


async def handle(ingress: IngressService, store: MemoryStore, *payloads: bytes) -> list[str]:
    now_ms = int(time.time() * 1000)
    ids = [store.add(keys.INGRESS, p, ms=now_ms) for p in payloads]
    await ingress.handle_batch(store.deliver(keys.INGRESS, keys.INGRESS_GROUP), keys.INGRESS)
    return ids


def answers(store: MemoryStore, client: str = "cli") -> dict[str, wire.Reply]:
    return {r.req_id: r for r in store.replies.get(client, [])}


async def test_requests_are_routed_by_cut_with_the_deadline_of_their_entry_and_acked(
        ingress: IngressService, store: MemoryStore) -> None:
    ids = await handle(ingress, store, request("a", cut=2), request("b", cut=INFO.n_blocks - 1))
    [a] = [wire.decode_request(p) for p in store.payloads(G0)]
    [b] = [wire.decode_request(p) for p in store.payloads(G1)]
    assert (a.req_id, b.req_id) == ("a", "b")
    assert a.received == int(ids[0].split("-")[0]) / 1000.0  # the store's clock, from the entry id
    assert a.deadline == pytest.approx(a.received + 0.5) and a.source == ids[0]
    assert store.pending(keys.INGRESS, keys.INGRESS_GROUP) == [] and not store.replies


async def test_bad_input_is_answered_with_its_code_and_unreadable_input_dead_lettered(
        ingress: IngressService, store: MemoryStore) -> None:
    ids = await handle(ingress, store, request("cut", cut=99), request("model", model="nope"),
                       request("shape", tensor=np.zeros((1, 2), np.float32)), b"\x93garbage",
                       msgpack.packb({"req_id": "x", "client": "cli", "cut": "seven"}))
    got = answers(store)
    assert {k: str(v.error.code) for k, v in got.items() if v.error} == {
        "cut": "BAD_CUT", "model": "UNKNOWN_MODEL", "shape": "BAD_TENSOR", "x": "INVALID_REQUEST"}
    assert [d.entry_id for d in store.dead_letters] == [ids[3]]  # no readable ids: nobody to answer
    assert store.pending(keys.INGRESS, keys.INGRESS_GROUP) == []
    assert store.payloads(G0) == [] and store.payloads(G1) == []


async def test_a_store_outage_leaves_the_batch_pending_to_be_read_again(
        ingress: IngressService, store: MemoryStore) -> None:
    store.down = True
    with pytest.raises(StoreUnavailable):
        await handle(ingress, store, request("a"), request("b", cut=99))
    store.down = False
    assert len(store.pending(keys.INGRESS, keys.INGRESS_GROUP)) == 2
    assert store.payloads(G0) == [] and not store.replies


async def test_a_route_the_store_refuses_is_answered_not_lost(ingress: IngressService, store: MemoryStore) -> None:
    store.refuse_appends_to.add(G0)
    await handle(ingress, store, request("a"), request("b", cut=INFO.n_blocks - 1))
    got = answers(store)
    assert list(got) == ["a"] and got["a"].error is not None and str(got["a"].error.code) == "INTERNAL"
    assert "routing failed" in got["a"].error.message
    assert [wire.decode_request(p).req_id for p in store.payloads(G1)] == ["b"]
    assert store.pending(keys.INGRESS, keys.INGRESS_GROUP) == []


async def test_blob_requests_are_checked_and_a_refused_ones_blob_deleted(
        ingress: IngressService, store: MemoryStore) -> None:
    shape = INFO.cut_shape(2)
    data = np.full(shape, 0.5, np.float32).tobytes()
    meta = wire.TensorMeta("float32", tuple(shape))
    store.blob_store[keys.blob("ok")] = data
    store.blob_store[keys.blob("short")] = data[:-4]
    await handle(ingress, store,
                 request("ok", tensor=None, blob=keys.blob("ok"), blob_meta=meta),
                 request("short", tensor=None, blob=keys.blob("short"), blob_meta=meta),
                 request("gone", tensor=None, blob=keys.blob("gone"), blob_meta=meta))
    assert [wire.decode_request(p).req_id for p in store.payloads(G0)] == ["ok"]
    assert store.ttl_ms[keys.blob("ok")] == int(500.0 + ingress.blob_margin_ms)
    got = answers(store)
    assert {k: str(v.error.code) for k, v in got.items() if v.error} == {"short": "BAD_TENSOR", "gone": "BAD_TENSOR"}
    assert keys.blob("short") in store.deleted and keys.blob("ok") in store.blob_store

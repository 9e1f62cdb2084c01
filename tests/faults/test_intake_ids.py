"""A replica judges a group-stream entry's ids as the ingress does (found by the fault suite: a request
with ``req_id`` "has space" written straight to a group stream was served and answered by a replica,
while the ingress dead-letters the same message as unanswerable — 25 of 600 unreadable messages got a
reply no producer could match)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common.contract import wire
from common.model.zoo import describe
from services.ingress.validate import answerable_ids
from services.worker.intake import Intake, Job, Rejection

INFO = describe("resnet18", 32)


def entry(req_id: object, client: object) -> bytes:
    x = np.zeros(INFO.cut_shape(3), dtype=np.float32)
    env = {"v": 1, "kind": "request", "req_id": req_id, "client": client, "model": "resnet18", "cut": 3,
           "tensor": wire.encode_tensor(x), "budget_ms": 500.0}
    out: bytes = msgpack.packb(env, use_bin_type=True)
    return out


@pytest.mark.parametrize(("req_id", "client"), [
    ("has space", "c"), ("r", "two words"), ("tab\there", "c"), ("r", "new\nline"), ("x" * 257, "c"), ("r", "")])
def test_ids_the_ingress_cannot_answer_are_dead_lettered_by_a_replica_too(req_id: str, client: str) -> None:
    raw = entry(req_id, client)
    assert answerable_ids(raw) is None  # the ingress: nobody to answer
    got = Intake(INFO).admit("1-0", raw, now=1.0)
    assert isinstance(got, Rejection) and got.req_id is None and got.client is None
    assert str(got.error.code) == "INVALID_REQUEST"


def test_sane_ids_still_make_a_job() -> None:
    got = Intake(INFO).admit("1-0", entry("r-1", "phone-7"), now=1.0)
    assert isinstance(got, Job) and (got.req_id, got.client) == ("r-1", "phone-7")


def bare(**over: object) -> bytes:
    """A request written straight to a group stream (no ingress stamped a deadline on it)."""
    x = np.zeros(INFO.cut_shape(3), dtype=np.float32)
    env: dict[str, object] = {"v": 1, "kind": "request", "req_id": "r", "client": "c", "model": "resnet18",
                              "cut": 3, "tensor": wire.encode_tensor(x), "budget_ms": 500.0}
    env.update(over)
    for k in [k for k, v in over.items() if v is DROP]:
        env.pop(k)
    out: bytes = msgpack.packb(env, use_bin_type=True)
    return out


DROP = object()


@pytest.mark.parametrize("over", [{"budget_ms": DROP}, {"budget_ms": -5.0}, {"budget_ms": 1e12},
                                  {"budget_ms": DROP, "slo_ms": 100.0, "device_ms": 500.0}],
                         ids=["none", "negative", "huge", "slo-below-device"])
def test_an_entry_without_a_deadline_needs_a_budget_the_ingress_would_accept(over: dict[str, object]) -> None:
    # Found by the fault suite: such entries were served with the largest budget (60 s) as their deadline,
    # 625 of them queued behind a replica's model for seconds, and every entry behind them — the
    # malformed ones to answer at once included — was answered late.
    got = Intake(INFO).admit("1-0", bare(**over), now=1.0)
    assert isinstance(got, Rejection) and (got.req_id, got.client) == ("r", "c")
    assert str(got.error.code) == "INVALID_REQUEST"


def test_an_entry_without_a_deadline_gets_its_own_budget() -> None:
    got = Intake(INFO).admit("1-0", bare(), now=100.0)
    assert isinstance(got, Job) and got.deadline == pytest.approx(100.5)
    stamped = msgpack.unpackb(bare(), raw=False)
    stamped.update(received=99.0, deadline=99.2)  # an ingress's deadline is kept as it is
    job = Intake(INFO).admit("2-0", msgpack.packb(stamped, use_bin_type=True), now=100.0)
    assert isinstance(job, Job) and job.deadline == pytest.approx(99.2)

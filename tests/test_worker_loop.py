"""A replica's pure parts: the latency model, intake (entry → job or error), and the batch loop run
against a fake runner and a list sink — no Redis, no processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from common.batching import Pending
from common.contract import keys, wire
from common.contract.errors import ErrorCode
from common.model.zoo import ModelInfo, build_blocks, describe
from common.profiles import make_profile
from common.settings import Settings
from services.worker import loop as loop_mod
from services.worker.intake import Intake, Job, Rejection, job_key
from services.worker.latency import LatencyModel, latency_model, load_profile_model, work_units
from services.worker.loop import BatchLoop, Done
from tests.helpers import until
from tests.worker_helpers import CLIENT, blob_request, request

MODEL, RES = "resnet18", 32
STREAM = keys.group_stream(3, "g0")


@pytest.fixture(scope="module")
def blocks() -> list[torch.nn.Module]:
    torch.set_num_threads(1)
    return build_blocks(MODEL, resolution=RES, seed=0)


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return describe(MODEL, RES)


# ---------------------------------------------------------------------------------------- latency


def test_latency_model_follows_measurements() -> None:
    batches, shares = [1, 2, 4, 8], [1, 2]
    blocks = [{"name": f"b{j}", "out_bytes": 4, "flops": 1,
               "latency_ms": [[float(b), float(b) / 2] for b in batches]} for j in range(4)]
    prof = make_profile("measured", "cpu", "cpu_threads", batches, shares,
                        {"m": {"input_shape": [1], "input_bytes": 4, "blocks": blocks}}).model("m")
    lat = LatencyModel(4, profile=prof, share=1)
    assert lat.source == "profile"
    # Re-aligned: 2 requests join at cut 0 (b=2 for blocks 0..1), 2 more at cut 2 (b=4 for blocks 2..3).
    assert lat.predict_ms({0: 2, 2: 2}) == pytest.approx(2 + 2 + 4 + 4)
    for _ in range(30):
        lat.observe({0: 1}, 0.008)  # the host is twice as slow as the profile says (4 ms predicted)
    assert lat.ratio == pytest.approx(2.0, rel=0.05)
    assert lat.predict_ms({0: 4}) == pytest.approx(2 * 16, rel=0.05)  # unseen composition: scaled
    assert lat.predict_ms({0: 1}) == pytest.approx(8.0, rel=0.01)  # seen composition: its own EWMA
    assert lat.samples == 30
    lat.observe({0: 1}, float("nan"))
    lat.observe({}, 0.1)
    assert lat.samples == 30  # nonsense is ignored
    off_grid = LatencyModel(4, profile=prof, share=3, prior_ms=10.0, prior_batch=1, prior_cut=0)
    assert off_grid.source == "online" and "share" in off_grid.fallback_reason
    assert off_grid.predict_ms({0: 1}) == pytest.approx(10.0)
    assert off_grid.predict_ms({0: 2}) > off_grid.predict_ms({0: 1}) > off_grid.predict_ms({3: 1})
    assert work_units({0: 2, 2: 1}, 4) == 2 * 4 + 2 + 4
    # A re-targeted replica of the same share keeps what it learnt of this host (the agent's new group).
    fresh = LatencyModel(4, profile=prof, share=1)
    fresh.carry_from(lat)
    assert fresh.ratio == pytest.approx(lat.ratio) and fresh.samples == lat.samples


def test_latency_model_comes_from_the_profile_when_it_fits() -> None:
    prof = load_profile_model(Settings(), MODEL, "v100-estimated")  # the plan's profile
    assert prof is not None
    on_cpu = latency_model(prof, prof.n_blocks, 1)  # 1 is not a GPU grid share
    assert on_cpu.source == "online" and "share" in on_cpu.fallback_reason
    on_gpu = latency_model(prof, prof.n_blocks, 50)
    assert on_gpu.source == "profile" and on_gpu.predict_ms({4: 2, 8: 2}) > on_gpu.predict_ms({8: 2}) > 0
    assert load_profile_model(Settings(profile="/nonexistent/profile.json"), MODEL) is None
    assert load_profile_model(Settings(), MODEL) is None  # none configured: online
    assert latency_model(None, 14, 50).source == "online"
    # GRAFT_PROFILE wins over the plan's
    assert load_profile_model(Settings(profile="v100-estimated"), MODEL, "no-such-profile") is not None


# ----------------------------------------------------------------------------------------- intake


def test_intake_rejects_what_the_runner_cannot_take(blocks: list[torch.nn.Module], info: ModelInfo) -> None:
    intake = Intake(info)
    good, _ = request(blocks, MODEL, "ok", 8, 1, res=RES)
    job = intake.admit("1-0", good, stream=STREAM)
    assert isinstance(job, Job) and job.pending.cut == 8 and job.entry_id == "1-0" and job.key == job_key(STREAM, "1-0")
    assert (job.epoch, job.group, job.stream, job.request.source) == (3, "g0", STREAM, "ok-src")
    low, _ = request(blocks, MODEL, "low", 0, 1, res=RES)  # any cut of the model runs: a replica holds it all
    assert isinstance(intake.admit("2-0", low), Job)
    past = wire.decode_request(good)
    past.cut = info.n_blocks  # no such block
    bad_cut = intake.admit("3-0", wire.encode_request(past))
    assert isinstance(bad_cut, Rejection) and bad_cut.error.code == ErrorCode.BAD_CUT and bad_cut.req_id == "ok"
    other = wire.decode_request(good)
    other.model = "mobilenet_v2"
    wrong_model = intake.admit("4-0", wire.encode_request(other))
    assert isinstance(wrong_model, Rejection) and wrong_model.error.code == ErrorCode.INVALID_REQUEST
    wrong = wire.encode_request(wire.Request("shape", CLIENT, MODEL, 4, np.zeros((3, 3), np.float32), budget_ms=9))
    rej = intake.admit("5-0", wrong)
    assert isinstance(rej, Rejection) and rej.error.code == ErrorCode.BAD_TENSOR and rej.client == CLIENT
    garbage = intake.admit("6-0", b"\x93not a request")
    assert isinstance(garbage, Rejection) and garbage.req_id is None  # nobody to answer: dead-lettered
    half = intake.admit("7-0", wire.packb({"kind": "request", "req_id": "half", "client": CLIENT}))
    assert isinstance(half, Rejection) and (half.req_id, half.client) == ("half", CLIENT)  # ids peeked
    # no deadline: did not come through an ingress; its own budget, checked as the ingress checks it, sets it
    bare = wire.decode_request(good)
    bare.deadline, bare.received = None, 100.0
    job = intake.admit("8-0", wire.encode_request(bare), now=100.0)
    assert bare.budget_ms is not None
    assert isinstance(job, Job) and job.deadline == pytest.approx(100.0 + bare.budget_ms / 1000.0)


def test_intake_takes_blob_requests_on_metadata_and_attaches_a_copy(blocks: list[torch.nn.Module],
                                                                   info: ModelInfo) -> None:
    intake = Intake(info)
    payload, data, _ = blob_request(blocks, MODEL, "b", 8, 1, res=RES)
    job = intake.admit("1-0", payload)
    assert isinstance(job, Job) and job.needs_blob and job.blob == keys.blob("b")
    buf = bytearray(data)
    attached = intake.attach(job, buf)
    assert attached is job and not job.needs_blob and job.request.tensor is not None
    t = job.request.tensor
    assert t.shape == info.cut_shape(8) and t.flags.owndata and t.flags.writeable
    buf[:4] = b"\xff" * 4
    assert t.reshape(-1)[0] == np.frombuffer(data[:4], np.float32)[0]  # a copy, not a view of the buffer
    gone = intake.attach(intake.admit("2-0", payload), None)  # type: ignore[arg-type]
    assert isinstance(gone, Rejection) and gone.error.code == ErrorCode.BAD_TENSOR and gone.blob == keys.blob("b")
    short = intake.attach(intake.admit("3-0", payload), data[:-4])  # type: ignore[arg-type]
    assert isinstance(short, Rejection) and short.error.details["got"] == len(data) - 4
    late = intake.admit("4-0", blob_request(blocks, MODEL, "late", 8, 1, res=RES, budget_ms=10, age_s=1.0)[0])
    assert isinstance(late, Job) and Intake.blob_expired(late, None, time.time())
    assert not Intake.blob_expired(late, data, time.time()) and not Intake.blob_expired(job, None, time.time())
    wrong, _, _ = blob_request(blocks, MODEL, "w", 4, 1, res=RES)  # cut 4's shape...
    obj = wire.decode_request(wrong)
    obj.cut = 8  # ...sent for cut 8
    rej = intake.admit("5-0", wire.encode_request(obj))
    assert isinstance(rej, Rejection) and rej.error.code == ErrorCode.BAD_TENSOR and rej.blob == keys.blob("w")


# ------------------------------------------------------------------------------------- batch loop


class FakeRunner:
    """Records each batch's cuts; answers with the cut number (so results can be matched); optional delay."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s

    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        self.batches.append([c for c, _ in items])
        if self.delay_s:
            time.sleep(self.delay_s)
        return [np.full((2,), float(c), np.float32) for c, _ in items]


class Broken:
    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        raise RuntimeError("device fell off the bus")


def job(entry_id: str, cut: int, *, deadline_in_s: float = 10.0, now: float | None = None) -> Job:
    now = time.time() if now is None else now
    req = wire.Request(f"req-{entry_id}", CLIENT, MODEL, cut, np.zeros((1,), np.float32), budget_ms=1000,
                       received=now, deadline=now + deadline_in_s, source=f"src-{entry_id}")
    return Job(entry_id, req, Pending(entry_id, cut, now + deadline_in_s, now), now, stream=STREAM, epoch=3,
               group="g0", admitted=now)


class Sink:
    def __init__(self) -> None:
        self.done: list[Done] = []
        self.calls = 0

    async def __call__(self, done: list[Done]) -> None:
        self.calls += 1
        self.done.extend(done)


def make_loop(runner: Any, *, max_batch: int = 4, ms: float = 1.0, eager: bool = True) -> tuple[BatchLoop, Sink]:
    sink = Sink()
    return BatchLoop(runner, LatencyModel(14, prior_ms=ms), sink, max_batch=max_batch, eager=eager), sink


async def serve_queued(loop: BatchLoop) -> None:
    stop = asyncio.Event()
    stop.set()  # serve what is queued, then return
    await asyncio.wait_for(loop.run(stop), 10)


async def test_a_failing_batch_answers_internal() -> None:
    loop, sink = make_loop(Broken(), max_batch=2)
    for i in range(2):
        assert loop.add(job(f"{i}-1", 4))
    await serve_queued(loop)
    assert sorted(d.entry_id for d in sink.done) == ["0-1", "1-1"] and loop.idle
    for d in sink.done:
        assert not d.reply.ok and d.reply.error is not None and d.reply.error.code == ErrorCode.INTERNAL
        assert "fell off the bus" in d.reply.error.message and d.reply.batch == 2 and d.reply.epoch == 3
        assert d.stream == STREAM and d.reply.source == f"src-{d.entry_id}"  # acked on its stream, per submission


async def test_batches_are_edf_realigned_and_at_most_max_batch() -> None:
    runner = FakeRunner()
    loop, sink = make_loop(runner, max_batch=3)
    now = time.time()
    # deadlines in a different order than arrival; cuts mixed
    cuts = {}
    for i, (cut, dl) in enumerate([(8, 9.0), (0, 2.0), (4, 5.0), (0, 1.0), (8, 3.0), (4, 7.0), (0, 8.0)]):
        loop.add(job(f"{i}-0", cut, deadline_in_s=dl, now=now))
        cuts[f"{i}-0"] = cut
    assert not loop.add(job("1-0", 0, now=now))  # already held: a re-read of the same entry
    await serve_queued(loop)
    assert [len(b) for b in runner.batches] == [3, 3, 1]
    order = [d.entry_id for d in sink.done]
    assert order == ["3-0", "1-0", "4-0", "2-0", "5-0", "6-0", "0-0"]  # earliest deadline first
    assert sorted(runner.batches[0]) == [0, 0, 8]  # one re-aligned batch of mixed cuts
    for d in sink.done:
        assert d.reply.ok and d.reply.tensor is not None and d.reply.batch in (3, 1)
        assert d.reply.tensor[0] == cuts[d.entry_id]  # each output goes back to its own request
        t = d.reply.timings
        assert t is not None and t["compute_ms"] >= 0 and d.reply.server_ms >= 0
    assert loop.batches == 3 and loop.served == 7 and loop.idle and loop.latency.samples == 3


async def test_requests_that_cannot_make_it_are_answered_deadline_exceeded_unrun() -> None:
    runner = FakeRunner()
    loop, sink = make_loop(runner, max_batch=4, ms=50.0)
    now = time.time()
    loop.add(job("late-0", 0, deadline_in_s=-0.1, now=now))  # passed already
    loop.add(job("hopeless-0", 0, deadline_in_s=0.01, now=now))  # 10 ms left, 50 ms to run alone
    loop.add(job("fine-0", 8, deadline_in_s=5.0, now=now))
    await serve_queued(loop)
    codes = {d.entry_id: d.reply.error.code if d.reply.error else "ok" for d in sink.done}
    assert codes == {"late-0": ErrorCode.DEADLINE_EXCEEDED, "hopeless-0": ErrorCode.DEADLINE_EXCEEDED, "fine-0": "ok"}
    assert runner.batches == [[8]] and loop.expired == 2
    late = next(d for d in sink.done if d.entry_id == "late-0")
    assert late.reply.error is not None and late.reply.error.details["late_ms"] >= 100 - 1


class SlowSink(Sink):
    """A reply round trip that takes ``delay_s``; records how many batches the runner had started at each call's end."""

    def __init__(self, runner: FakeRunner, delay_s: float) -> None:
        super().__init__()
        self.runner, self.delay_s = runner, delay_s
        self.launched_by_end: list[int] = []

    async def __call__(self, done: list[Done]) -> None:
        await asyncio.sleep(self.delay_s)
        await super().__call__(done)
        self.launched_by_end.append(len(self.runner.batches))


async def test_the_next_batch_runs_while_the_last_ones_replies_are_written() -> None:
    runner = FakeRunner(delay_s=0.05)
    sink = SlowSink(runner, delay_s=0.2)
    loop = BatchLoop(runner, LatencyModel(14, prior_ms=5.0), sink, max_batch=2)
    for i in range(6):
        loop.add(job(f"{i}-0", 0, deadline_in_s=30.0))
    t0 = time.perf_counter()
    await serve_queued(loop)
    elapsed = time.perf_counter() - t0
    # Batch k+1 was computed while batch k's replies were on their way: when the first batch's replies were
    # written, the second batch had already started (a loop that waited for the sink would show 1).
    assert sink.launched_by_end[0] >= 2
    # Each reply once, in batch order, and all written before run() returned; at most one batch's replies
    # outstanding, so three batches take 3 x 0.2 s of replies plus the first batch's 0.05 s, not 3 x 0.25 s.
    assert [d.entry_id for d in sink.done] == [f"{i}-0" for i in range(6)] and sink.calls == 3 and loop.idle
    assert loop.batches == 3 and elapsed < 3 * 0.25 - 0.02


async def test_retarget_applies_at_the_next_batch_boundary() -> None:
    runner = FakeRunner(delay_s=0.2)
    loop, sink = make_loop(runner, max_batch=2, ms=5.0)  # predicted above INLINE_S: batches run in a thread
    stop = asyncio.Event()
    for i in range(8):
        loop.add(job(f"{i}-0", 0, deadline_in_s=30.0))
    task = asyncio.create_task(loop.run(stop))
    await until(lambda: runner.batches, 5, "the first batch (of 2) running")
    loop.retarget(max_batch=4, latency=LatencyModel(14, prior_ms=5.0), group="g9")
    await until(lambda: not loop.jobs, 5, "every job served")
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [len(b) for b in runner.batches] == [2, 4, 2]  # the batch in flight kept its size
    assert loop.group == "g9" and len(sink.done) == 8


async def test_space_for_reads_opens_as_batches_finish() -> None:
    loop, _sink = make_loop(FakeRunner(delay_s=0.05), max_batch=2)
    for i in range(4):
        loop.add(job(f"{i}-0", 0))
    waiter = asyncio.create_task(loop.wait_for_space(4))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # full: the reader must not read ahead
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    await asyncio.wait_for(waiter, 5)
    assert loop.size < 4
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_an_idle_loop_does_not_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    loop, _sink = make_loop(FakeRunner(), eager=False)
    decisions = 0
    decide = loop.policy.decide

    def counting(*a: Any, **kw: Any) -> Any:
        nonlocal decisions
        decisions += 1
        return decide(*a, **kw)

    monkeypatch.setattr(loop.policy, "decide", counting)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    await asyncio.sleep(0.8)
    idle = decisions
    assert idle <= 1 + 0.8 / loop_mod.IDLE_WAIT_S + 1  # woken by the idle timer only
    # one request with slack (slack mode): it waits for its slack, it does not poll
    loop.add(job("s-0", 0, deadline_in_s=0.4))
    await asyncio.sleep(0.7)
    # Served, or — when the slack timer fired later than the margin allows on a busy host — answered
    # DEADLINE_EXCEEDED unrun; either way once, and without polling.
    assert 1 <= decisions - idle <= 6 and loop.served + loop.expired == 1
    stop.set()
    loop.wake()
    await asyncio.wait_for(task, 5)


async def test_a_stopping_loop_serves_what_it_holds_without_waiting() -> None:
    runner = FakeRunner()
    loop, sink = make_loop(runner, max_batch=4, eager=False)  # slack mode would hold a lone request
    loop.add(job("0-0", 0, deadline_in_s=30.0))
    t0 = time.monotonic()
    await serve_queued(loop)
    assert time.monotonic() - t0 < 1.0 and [d.entry_id for d in sink.done] == ["0-0"]

"""One timing definition for profiler and replicas (common.model.timing), checked on the CPU.

The runner's compute span covers its blocks and nothing else (staging and copies are timed apart, and
the device is synchronised around exactly that span); the profiler's per-block figures add up to it;
the batch loop learns from that span, not from its own wall clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from common.batching import Pending
from common.contract import wire
from common.model import executor as executor_module
from common.model import timing
from common.model.executor import FragmentRunner, warm_up
from common.model.zoo import describe
from services.worker.intake import Job
from services.worker.latency import LatencyModel
from services.worker.loop import BatchLoop, Done, TimedRunner

MODEL, RES = "resnet18", 32
BLOCK_S = 0.004


class VirtualClock:
    """``timing.clock`` for tests: time moves only when a block or a stage says it took some."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class Costly(nn.Module):
    """A block that takes ``BLOCK_S`` of the virtual clock and keeps its input's shape."""

    def __init__(self, log: list[str], clock: VirtualClock, j: int) -> None:
        super().__init__()
        self.log, self.clock, self.j = log, clock, j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(f"block{self.j}")
        self.clock.advance(BLOCK_S)
        return x + 1.0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    c = VirtualClock()
    monkeypatch.setattr(timing, "clock", c)
    return c


@pytest.fixture
def costly(monkeypatch: pytest.MonkeyPatch, clock: VirtualClock) -> tuple[FragmentRunner, list[str]]:
    """A resnet18-shaped runner of blocks of known cost that keep the input's shape (so every cut takes it)."""
    log: list[str] = []
    n = describe(MODEL, RES).n_blocks
    monkeypatch.setattr(executor_module, "build_blocks", lambda *a, **k: [Costly(log, clock, j) for j in range(n)])
    runner = FragmentRunner(MODEL, resolution=RES, optimize=False)  # a trace would drop the ticks
    same = tuple(dataclasses.replace(b, out_shape=runner.info.input_shape) for b in runner.info.blocks)
    runner.info = dataclasses.replace(runner.info, blocks=same)
    return runner, log


def test_the_compute_span_is_the_blocks_and_only_the_blocks(costly: tuple[FragmentRunner, list[str]],
                                                            clock: VirtualClock,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    runner, log = costly
    n = runner.n_blocks
    monkeypatch.setattr(executor_module, "synchronize", lambda device: log.append("sync"))
    stage = runner._stage

    def slow_stage(items: Any) -> Any:
        log.append("stage")
        clock.advance(0.05)  # a slow upload: must land in copy, never in compute
        return stage(items)

    monkeypatch.setattr(runner, "_stage", slow_stage)
    x = np.zeros((3, RES, RES), np.float32)
    out = runner.run_numpy([(0, x), (5, x), (0, x)])
    assert [o[0, 0, 0] for o in out] == [n, n - 5, n]  # each request ran its own blocks once
    # staged first, then the synchronised span holds exactly the blocks of the re-aligned batch
    assert log == ["stage", "sync", *(f"block{j}" for j in range(n)), "sync"]
    t = runner.last_timing
    assert t is not None and runner.last_compute_s == t.compute_s and runner.last_copy_s == t.copy_s
    assert t.compute_s == pytest.approx(n * BLOCK_S) and t.upload_s == pytest.approx(0.05)
    assert t.download_s == 0.0 and t.copy_s == pytest.approx(0.05)


def test_a_failed_batch_leaves_no_stale_timing(costly: tuple[FragmentRunner, list[str]]) -> None:
    runner, _ = costly
    runner.run_numpy([(0, np.zeros((3, RES, RES), np.float32))])
    assert runner.last_compute_s is not None
    with pytest.raises(Exception, match="float32"):
        runner.run_numpy([(0, np.zeros((3, RES, RES), np.float64))])
    assert runner.last_timing is None and runner.last_compute_s is None and runner.last_copy_s == 0.0
    assert runner.run_realigned([]) == [] and runner.last_compute_s == 0.0


def test_copies_are_timed_apart_and_nearly_free_on_the_cpu() -> None:
    """A real model: the compute span is most of the batch, staging and the copy back a sliver.
    (That the profile's per-block sum equals the span is tests/test_doctor.py's agreement probe.)"""
    runner = FragmentRunner(MODEL, resolution=RES)
    rng = np.random.default_rng(0)
    items = [(0, rng.standard_normal((3, RES, RES), dtype=np.float32)) for _ in range(4)]
    spans, copies = [], []
    for _ in range(4):
        runner.run_numpy(items)
        t = runner.last_timing
        assert t is not None and t.compute_s > 0 and t.upload_s > 0 and t.download_s >= 0
        spans.append(t.compute_s)
        copies.append(t.copy_s)
    assert float(np.median(copies)) < 0.2 * float(np.median(spans))


def test_wall_ms_and_bursts() -> None:
    calls: list[int] = []
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert timing.wall_ms(lambda: calls.append(1), cpu, runs=5) >= 0 and len(calls) == 5
    slept = timing.wall_ms(lambda: time.sleep(0.01), cpu, runs=2)
    assert 10.0 <= slept < 30.0  # per run, not per burst
    assert timing.burst_for(0.1, cpu) == 1  # the CPU never bursts: CPU profiles are unchanged
    assert timing.burst_for(0.1, cuda) == 10 and timing.burst_for(0.001, cuda) == timing.MAX_BURST
    assert timing.burst_for(1.0, cuda) == 1 and timing.burst_for(25.0, cuda) == 1
    assert timing.burst_for(float("nan"), cuda) == 1


def test_prepare_device_turns_autotuning_on_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    timing.prepare_device("cpu")
    assert torch.backends.cudnn.benchmark is False
    timing.prepare_device("cuda")
    assert torch.backends.cudnn.benchmark is True


class FakeRunner:
    """Duck-typed FragmentRunner for ``warm_up``: records batch sizes and cuts."""

    def __init__(self, device: str) -> None:
        self.device, self.min_cut, self.n_blocks = device, 0, 14
        self.info = describe(MODEL, RES)
        self.batches: list[list[int]] = []

    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        self.batches.append([c for c, _ in items])
        return []


def test_warm_up_covers_every_batch_size_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cpu = FakeRunner("cpu")
    warm_up(cpu, max_batch=8)  # type: ignore[arg-type]
    assert cpu.batches == [[0, 0, 7]] and torch.backends.cudnn.benchmark is False
    gpu = FakeRunner("cuda")
    warm_up(gpu, max_batch=8)  # type: ignore[arg-type]
    assert gpu.batches[0] == [0, 0, 7] and [len(b) for b in gpu.batches[1:]] == list(range(1, 9))
    assert all(set(b) == {0} for b in gpu.batches[1:]) and torch.backends.cudnn.benchmark is True


# ------------------------------------------------------------------------------ the batch loop


class SelfTimed:
    """Takes ``wall_s`` of wall clock but reports a compute span of ``compute_s`` (as FragmentRunner does)."""

    def __init__(self, wall_s: float, compute_s: float, copy_s: float) -> None:
        self.wall_s, self.compute_s, self.copy_s = wall_s, compute_s, copy_s
        self.last_compute_s: float | None = None
        self.last_copy_s = 0.0

    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        time.sleep(self.wall_s)
        self.last_compute_s, self.last_copy_s = self.compute_s, self.copy_s
        return [np.zeros(2, np.float32) for _ in items]


class WallOnly:
    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        time.sleep(0.03)
        return [np.zeros(2, np.float32) for _ in items]


class Recording(LatencyModel):
    def __init__(self) -> None:
        super().__init__(14, prior_ms=1.0)
        self.seen: list[float] = []

    def observe(self, counts: Any, measured_s: float) -> None:
        self.seen.append(measured_s)
        super().observe(counts, measured_s)


def _job(i: int) -> Job:
    now = time.time()
    req = wire.Request(f"r{i}", "c", MODEL, 0, np.zeros((1,), np.float32), budget_ms=5000, received=now,
                       deadline=now + 5.0, source=f"s{i}")
    return Job(f"{i}-0", req, Pending(f"{i}-0", 0, now + 5.0, now), now, stream="s", epoch=1, group="g", admitted=now)


async def _serve(runner: Any) -> tuple[BatchLoop, Recording, list[Done]]:
    done: list[Done] = []

    async def sink(batch: list[Done]) -> None:
        done.extend(batch)

    latency = Recording()
    loop = BatchLoop(runner, latency, sink, max_batch=4)
    for i in range(2):
        loop.add(_job(i))
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(loop.run(stop), 10)
    return loop, latency, done


async def test_the_loop_learns_the_runners_compute_span_not_its_wall_clock() -> None:
    runner = SelfTimed(wall_s=0.03, compute_s=0.005, copy_s=0.002)
    assert isinstance(runner, TimedRunner) and not isinstance(WallOnly(), TimedRunner)
    before = BatchLoop(runner, LatencyModel(14), _noop, max_batch=4).margin_s
    loop, latency, done = await _serve(runner)
    assert latency.seen == [0.005]  # what the profile is compared with
    assert len(done) == 2
    for d in done:
        assert d.reply.timings is not None
        assert d.reply.timings["compute_ms"] == 5.0 and d.reply.timings["copy_ms"] == 2.0
    # the wall clock's excess (copies, thread handoff) moves into the launch margin instead
    assert loop.overhead_s > 0.004 and loop.margin_s > before


async def test_a_runner_that_does_not_time_itself_is_timed_by_the_wall_clock() -> None:
    loop, latency, done = await _serve(WallOnly())
    assert len(latency.seen) == 1 and latency.seen[0] >= 0.03
    assert all(d.reply.timings is not None and d.reply.timings["copy_ms"] == 0.0 for d in done)
    assert loop.overhead_s == 0.0


async def _noop(done: list[Done]) -> None:
    return None

"""Load generator: open-loop arrivals against a running Graft, judged where the user stands.

Every request has an *intended send time* drawn in advance (Poisson arrivals); its latency is measured
at the producer from that intended time to the reply, so a generator that falls behind cannot hide
queueing — its lateness counts against the system like any other wait. A request *meets its SLO*
when it is answered OK within the budget it asked for; errors and timeouts are misses.

Two ways to describe the load: ``EmulatedDevice``s (``emulate_devices``: phones whose cut and budget
the partitioner picks from their class and a real or synthetic uplink, each at its own rate — the
demo), or a ``Mix`` of ``(model, cut, budget)`` classes at one total rate (the benchmarks). Requests
go through a ``Submitter``: the Redis SDK here (``RedisSubmitter``), the gateway's HTTP or gRPC
front door in ``tools/gateway_submit.py``. Tensors have the exact shape of their cut; their content is
random (computing real prefixes would steal the CPU the server is measured on; the test suite checks
results against local execution).

While a load runs, the generator's own garbage collector is held off (``collections_deferred``):
the records a long benchmark keeps make a full collection take 100-300 ms, during which nothing is
sent — the fault suite's generator stalled 9 times in one 35 s overload run (longest 282 ms), and every
request due meanwhile went out late and counted as a miss of the system. Reference counting still
frees everything acyclic; the cycles are collected once the load is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from common.client import GraftClient
from common.contract import wire
from common.model import zoo as registry
from common.profiles import Profile

_deferring = 0  # loads running that hold the collector off (they may overlap)
_was_enabled = True  # the collector's state before the first of them


@contextlib.contextmanager
def collections_deferred() -> Iterator[None]:
    """No garbage collection pause while a load runs (see the module's doc); nests, and collects after."""
    global _deferring, _was_enabled
    if _deferring == 0:
        _was_enabled = gc.isenabled()
    _deferring += 1
    gc.disable()
    try:
        yield
    finally:
        _deferring -= 1
        if _deferring == 0 and _was_enabled:
            gc.enable()
            gc.collect()


class Submitter(Protocol):
    async def submit(self, model: str, cut: int, tensor: npt.NDArray[np.float32], *, budget_ms: float,
                     timeout_s: float) -> wire.Reply: ...

    async def aclose(self) -> None: ...


class RedisSubmitter:
    """Submits through the async SDK over Redis Streams."""

    def __init__(self, redis_url: str, *, client_id: str | None = None) -> None:
        self.client = GraftClient(redis_url, client_id=client_id or f"loadgen-{time.time_ns()}")

    async def start(self) -> RedisSubmitter:
        await self.client.start()
        return self

    async def submit(self, model: str, cut: int, tensor: npt.NDArray[np.float32], *, budget_ms: float,
                     timeout_s: float) -> wire.Reply:
        return await self.client.submit_reply(model, cut, tensor, budget_ms=budget_ms, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self.client.close()


@dataclass(frozen=True)
class EmulatedDevice:
    id: str
    model: str
    cut: int
    budget_ms: float
    slo_ms: float
    rate_rps: float
    device_class: str = "mid"
    bandwidth_bps: float = 0.0


@dataclass(frozen=True)
class RequestClass:
    model: str
    cut: int
    budget_ms: float
    weight: float = 1.0


@dataclass(frozen=True)
class Arrival:
    at_s: float  # intended send time, seconds after the start
    source: str  # device id or class label
    model: str
    cut: int
    budget_ms: float


@dataclass
class Outcome:
    source: str
    model: str
    cut: int
    budget_ms: float
    latency_ms: float  # client-measured: intended send time → reply (timeout: the timeout)
    ok: bool
    code: str
    server_ms: float
    batch: int | None
    group: str | None
    epoch: int | None
    timings: dict[str, float] | None = None
    send_lag_ms: float = 0.0  # how late the generator actually sent it
    at_s: float = 0.0  # its intended send time, seconds from the start of the load

    @property
    def met(self) -> bool:
        return self.ok and self.latency_ms <= self.budget_ms


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


@dataclass
class LoadReport:
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    devices: list[EmulatedDevice] = field(default_factory=list)
    unplaced: int = 0

    def summary(self) -> dict[str, Any]:
        outs = self.outcomes
        ok = [o for o in outs if o.ok]
        lat_all = [o.latency_ms for o in outs]
        lat_ok = [o.latency_ms for o in ok]
        batches = [o.batch for o in ok if o.batch]
        met = sum(o.met for o in outs)
        return {
            "requests": len(outs),
            "ok": len(ok),
            "met": met,
            "outcomes": dict(sorted(Counter(o.code for o in outs).items())),
            "slo_attainment": met / len(outs) if outs else 0.0,
            "latency_ms_p50": _pct(lat_all, 50), "latency_ms_p99": _pct(lat_all, 99),
            "ok_latency_ms_p50": _pct(lat_ok, 50), "ok_latency_ms_p99": _pct(lat_ok, 99),
            "server_ms_p50": _pct([o.server_ms for o in ok], 50), "server_ms_p99": _pct([o.server_ms for o in ok], 99),
            "send_lag_ms_p99": _pct([o.send_lag_ms for o in outs], 99),
            "mean_batch": float(np.mean(batches)) if batches else 0.0,
            "goodput_rps": met / self.duration_s if self.duration_s else 0.0,
            "offered_rps": len(outs) / self.duration_s if self.duration_s else 0.0,
            "breakdown_ms": self.breakdown(),
            "overhead_ms": self.overhead(),
            "misses_by_second": self.misses_by_second(),
            "devices": len(self.devices),
            "cuts": dict(sorted(Counter(f"{o.model}:{o.cut}" for o in outs).items())),
            "epochs": sorted({o.epoch for o in ok if o.epoch is not None}),
            "unplaced_devices": self.unplaced,
        }

    def misses_by_second(self) -> list[list[int]]:
        """``[second, sent, missed]`` for each second of intended send times: whether a point's misses are
        spread evenly (a steady shortfall) or bunched into a second or two (a stall of the host or a service)."""
        sent: Counter[int] = Counter()
        missed: Counter[int] = Counter()
        for o in self.outcomes:
            sec = int(o.at_s)
            sent[sec] += 1
            missed[sec] += not o.met
        return [[sec, sent[sec], missed[sec]] for sec in sorted(sent)]

    def overhead(self) -> dict[str, float]:
        """Per OK request: client latency minus its batch's compute (everything but the model), and that
        minus the replica's wait for its batch's turn too (the path alone: the client's send and read,
        the Redis hops, the ingress, the replica's read and reply)."""
        ok = [o for o in self.outcomes if o.ok and o.timings]
        outside = [o.latency_ms - (o.timings or {}).get("compute_ms", 0.0) for o in ok]
        path = [x - (o.timings or {}).get("wait_ms", 0.0) for x, o in zip(outside, ok, strict=True)]
        return {"outside_compute_p50": _pct(outside, 50), "outside_compute_p99": _pct(outside, 99),
                "path_p50": _pct(path, 50), "path_p99": _pct(path, 99), "n": float(len(ok))}

    def breakdown(self) -> dict[str, float]:
        """Median of where an OK request's time went: compute, batching wait, queueing before the replica,
        and the rest (client, Redis hops, ingress: client latency − server time)."""
        ok = [o for o in self.outcomes if o.ok and o.timings]
        if not ok:
            return {}
        return {
            "compute": _pct([o.timings.get("compute_ms", 0.0) for o in ok if o.timings], 50),
            "wait": _pct([o.timings.get("wait_ms", 0.0) for o in ok if o.timings], 50),
            "queue": _pct([o.timings.get("queue_ms", 0.0) for o in ok if o.timings], 50),
            "outside_server": _pct([max(0.0, o.latency_ms - o.server_ms) for o in ok], 50),
            "total": _pct([o.latency_ms for o in ok], 50),
        }


def emulate_devices(profile: Profile, model_names: Sequence[str], n: int, *, slo_ms: Sequence[float],
                    rate_rps: float, seed: int = 0, trace_path: str | Path | None = None,
                    mean_mbps: float = 8.0) -> tuple[list[EmulatedDevice], int]:
    """Devices whose cut and budget come from the partitioner; returns (devices, how many had no feasible cut)."""
    from common.client.partitioner import choose_cut
    from common.client.phones import DEVICE_CLASSES
    from common.client.traces import LinkTrace

    rng = random.Random(seed)
    trace = (LinkTrace.from_mahimahi(trace_path) if trace_path
             else LinkTrace.synthetic(mean_mbps=mean_mbps, seconds=120, seed=seed))
    classes = sorted(DEVICE_CLASSES)
    out: list[EmulatedDevice] = []
    unplaced = 0
    for i in range(n):
        model = model_names[i % len(model_names)]
        cls = rng.choice(classes)
        slo = rng.choice(list(slo_ms))
        bw = trace.bandwidth_bps(rng.uniform(0, max(trace.duration_s - 1.0, 0.0)), 1.0)
        choice = choose_cut(profile.model(model), DEVICE_CLASSES[cls], bw, slo)
        if choice is None:
            unplaced += 1
            continue
        out.append(EmulatedDevice(f"dev{i}", model, choice.cut, choice.budget_ms, slo, rate_rps, cls, bw))
    return out, unplaced


def device_arrivals(devices: Sequence[EmulatedDevice], duration_s: float, seed: int = 0) -> list[Arrival]:
    """Each device's own Poisson process over ``duration_s``, merged in time order."""
    out: list[Arrival] = []
    for dev in devices:
        rng = random.Random(f"{seed}-{dev.id}")
        t = rng.expovariate(dev.rate_rps)
        while t < duration_s:
            out.append(Arrival(t, dev.id, dev.model, dev.cut, dev.budget_ms))
            t += rng.expovariate(dev.rate_rps)
    out.sort(key=lambda a: a.at_s)
    return out


def mix_arrivals(mix: Sequence[RequestClass], rate_rps: float, duration_s: float, seed: int = 0) -> list[Arrival]:
    """One Poisson process at ``rate_rps``; each arrival's class drawn by weight."""
    rng = random.Random(seed)
    weights = [c.weight for c in mix]
    out: list[Arrival] = []
    t = rng.expovariate(rate_rps)
    while t < duration_s:
        c = rng.choices(mix, weights)[0]
        out.append(Arrival(t, f"{c.model}:{c.cut}:{c.budget_ms:g}", c.model, c.cut, c.budget_ms))
        t += rng.expovariate(rate_rps)
    return out


def tensors_for(arrivals: Sequence[Arrival], resolution: int | None, seed: int = 0) -> dict[tuple[str, int], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    keys = sorted({(a.model, a.cut) for a in arrivals})
    return {k: rng.standard_normal(registry.describe(k[0], resolution).cut_shape(k[1])).astype(np.float32) for k in keys}


async def drive(submitter: Submitter, arrivals: Sequence[Arrival], *, resolution: int | None, seed: int = 0,
                timeout_s: float = 10.0, on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Send every arrival at its intended time (open loop) and wait for every reply (or its timeout)."""
    tensors = tensors_for(arrivals, resolution, seed)
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(a: Arrival, intended: float) -> None:
        sent = time.perf_counter()
        try:
            rep = await submitter.submit(a.model, a.cut, tensors[(a.model, a.cut)], budget_ms=a.budget_ms,
                                         timeout_s=timeout_s)
            done = time.perf_counter()
            code = "OK" if rep.ok else (rep.error.code if rep.error else "INTERNAL")
            out = Outcome(a.source, a.model, a.cut, a.budget_ms, (done - intended) * 1000.0, rep.ok, code,
                          rep.server_ms, rep.batch, rep.group, rep.epoch, rep.timings, (sent - intended) * 1000.0, a.at_s)
        except TimeoutError:
            out = Outcome(a.source, a.model, a.cut, a.budget_ms, (time.perf_counter() - intended) * 1000.0, False,
                          "TIMEOUT", 0.0, None, None, None, None, (sent - intended) * 1000.0, a.at_s)
        except Exception as exc:  # a transport error is a miss like any other, never a crash of the run
            out = Outcome(a.source, a.model, a.cut, a.budget_ms, (time.perf_counter() - intended) * 1000.0, False,
                          f"CLIENT_{type(exc).__name__}", 0.0, None, None, None, None, (sent - intended) * 1000.0,
                          a.at_s)
        outcomes.append(out)
        if on_outcome is not None:
            on_outcome(out)

    with collections_deferred():
        start = time.perf_counter() + 0.05
        for a in arrivals:
            intended = start + a.at_s
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(a, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout_s + 2.0)
    return outcomes


async def run_load(redis_url: str, devices: Sequence[EmulatedDevice], *, duration_s: float, resolution: int | None,
                   seed: int = 0, timeout_s: float = 10.0, submitter: Submitter | None = None,
                   on_outcome: Callable[[Outcome], None] | None = None) -> LoadReport:
    """Open-loop Poisson load from every device for ``duration_s``, through ``submitter`` (default: Redis SDK)."""
    arrivals = device_arrivals(devices, duration_s, seed)
    own = submitter is None
    sub: Submitter = submitter if submitter is not None else await RedisSubmitter(
        redis_url, client_id=f"loadgen-{seed}-{int(time.time() * 1000)}").start()
    try:
        outcomes = await drive(sub, arrivals, resolution=resolution, seed=seed, timeout_s=timeout_s,
                               on_outcome=on_outcome)
    finally:
        if own:
            await sub.aclose()
    return LoadReport(duration_s=duration_s, outcomes=outcomes, devices=list(devices))

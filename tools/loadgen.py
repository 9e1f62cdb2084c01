"""Load generator: many emulated devices against a running Graft, reporting SLO attainment.

Each emulated device has a model, a phone class and an uplink (a mahimahi trace segment, or a synthetic
trace). Like a real client, it asks the partitioner for the cut that minimises its end-to-end latency
under its SLO, then sends requests at its frame rate (Poisson arrivals) with the server budget that the
partitioner computed. The tensor it uploads has the exact shape of its cut; its content is random
(computing real prefixes here would steal the CPU the server is measured on; the test suite checks
results against local execution). Request loops are bounded in count and time and stop by themselves.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.client.sdk import GraftClient
from common.model import zoo as registry
from common.profiles import Profile


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


@dataclass
class Outcome:
    device: str
    model: str
    cut: int
    budget_ms: float
    rtt_ms: float
    ok: bool
    code: str
    server_ms: float
    batch: int | None
    group: str | None
    epoch: int | None
    timings: dict[str, float] | None = None

    @property
    def met(self) -> bool:
        return self.ok and self.server_ms <= self.budget_ms


@dataclass
class LoadReport:
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    devices: list[EmulatedDevice] = field(default_factory=list)
    unplaced: int = 0

    def summary(self) -> dict[str, Any]:
        outs = self.outcomes
        ok = [o for o in outs if o.ok]
        codes = Counter(o.code for o in outs)
        server = np.array([o.server_ms for o in ok]) if ok else np.array([0.0])
        rtt = np.array([o.rtt_ms for o in ok]) if ok else np.array([0.0])
        batches = [o.batch for o in ok if o.batch]
        return {
            "requests": len(outs),
            "ok": len(ok),
            "outcomes": dict(sorted(codes.items())),
            "slo_attainment": (sum(o.met for o in outs) / len(outs)) if outs else 0.0,
            "server_ms_p50": float(np.percentile(server, 50)),
            "server_ms_p99": float(np.percentile(server, 99)),
            "rtt_ms_p50": float(np.percentile(rtt, 50)),
            "rtt_ms_p99": float(np.percentile(rtt, 99)),
            "mean_batch": float(np.mean(batches)) if batches else 0.0,
            "goodput_rps": sum(o.met for o in outs) / self.duration_s if self.duration_s else 0.0,
            "throughput_rps": len(outs) / self.duration_s if self.duration_s else 0.0,
            "devices": len(self.devices),
            "cuts": dict(sorted(Counter(f"{d.model}:{d.cut}" for d in self.devices).items())),
            "epochs": sorted({o.epoch for o in ok if o.epoch is not None}),
            "unplaced_devices": self.unplaced,
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


async def run_load(redis_url: str, devices: Sequence[EmulatedDevice], *, duration_s: float, resolution: int | None,
                   seed: int = 0, max_requests: int = 100_000, timeout_s: float = 10.0,
                   on_outcome: Callable[[Outcome], None] | None = None) -> LoadReport:
    """Open-loop Poisson load from every device for ``duration_s`` (bounded by ``max_requests``)."""
    rng = np.random.default_rng(seed)
    shapes = {(d.model, d.cut): registry.describe(d.model, resolution).cut_shape(d.cut) for d in devices}
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    report = LoadReport(duration_s=duration_s, devices=list(devices))
    sent = 0
    inflight: set[asyncio.Task[None]] = set()

    async with GraftClient(redis_url, client_id=f"loadgen-{seed}-{int(time.time() * 1000)}") as client:
        async def one(dev: EmulatedDevice) -> None:
            t0 = time.perf_counter()
            try:
                rep = await client.submit_reply(dev.model, dev.cut, tensors[(dev.model, dev.cut)],
                                                budget_ms=dev.budget_ms, timeout_s=timeout_s)
                out = Outcome(dev.id, dev.model, dev.cut, dev.budget_ms, (time.perf_counter() - t0) * 1000,
                              rep.ok, "OK" if rep.ok else (rep.error.code if rep.error else "INTERNAL"),
                              rep.server_ms, rep.batch, rep.group, rep.epoch, rep.timings)
            except TimeoutError:
                out = Outcome(dev.id, dev.model, dev.cut, dev.budget_ms, timeout_s * 1000, False, "TIMEOUT",
                              timeout_s * 1000, None, None, None)
            report.outcomes.append(out)
            if on_outcome is not None:
                on_outcome(out)

        async def device_loop(dev: EmulatedDevice, start: float) -> None:
            nonlocal sent
            drng = random.Random(f"{seed}-{dev.id}")
            t = start + drng.expovariate(dev.rate_rps)
            while t < start + duration_s and sent < max_requests:
                await asyncio.sleep(max(0.0, t - time.monotonic()))
                sent += 1
                task = asyncio.create_task(one(dev))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                t += drng.expovariate(dev.rate_rps)

        start = time.monotonic()
        await asyncio.gather(*(device_loop(d, start) for d in devices))
        if inflight:
            await asyncio.wait(set(inflight), timeout=timeout_s + 1)
    return report

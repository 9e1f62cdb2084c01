"""Workloads from emulated clients: each picks its cut the way Neurosurgeon does, the server sees fragments.

A client is a phone of one device class running one model at a frame rate under an SLO, behind an
uplink. ``emulate_clients`` draws clients reproducibly from a seed: model, device class, SLO and frame
rate uniformly from the lists given, and a point in time on one of the uplink traces; the bandwidth
the client plans with is the trace's capacity over the window starting there (a few seconds of a
real drive, so clients on the same trace see different links). ``clients_to_workload`` runs the
partitioner (``common.client.partitioner.choose_cut``) for each client: the chosen cut and the budget it
leaves the server become one fragment with the client's frame rate as its rate. Clients keep their
own ids; merging identical ``(model, cut)`` fragments is the planner's job. A client for which no cut
leaves the server enough time is rejected with the reason, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.client.partitioner import Mode, choose_cut
from common.client.phones import DEVICE_CLASSES
from common.client.traces import LinkTrace
from common.planning.types import Fragment
from common.profiles import Profile

BANDWIDTH_WINDOW_S = 2.0


@dataclass(frozen=True, slots=True)
class Client:
    id: str
    model: str
    device: str  # a device class name (common.client.phones.DEVICE_CLASSES)
    slo_ms: float
    fps: float
    bandwidth_bps: float
    trace: str
    start_s: float


@dataclass(frozen=True, slots=True)
class Rejected:
    client: str
    reason: str


@dataclass(frozen=True)
class Workload:
    fragments: list[Fragment]
    rejected: list[Rejected]

    def to_dict(self) -> dict[str, Any]:
        return {"fragments": [f.to_dict() for f in self.fragments]}


def emulate_clients(n: int, models: Sequence[str], slos_ms: Sequence[float], traces: Sequence[LinkTrace], *,
                    device_classes: Sequence[str] = ("low", "mid", "high"), fps: Sequence[float] = (5.0,),
                    seed: int = 0, window_s: float = BANDWIDTH_WINDOW_S, id_prefix: str = "c") -> list[Client]:
    """``n`` clients drawn reproducibly from ``seed`` (see the module docstring)."""
    if n < 0:
        raise ValueError("the number of clients must be >= 0")
    for name, seq in (("models", models), ("SLOs", slos_ms), ("traces", traces),
                      ("device classes", device_classes), ("frame rates", fps)):
        if not seq:
            raise ValueError(f"at least one of {name} is needed")
    unknown = [d for d in device_classes if d not in DEVICE_CLASSES]
    if unknown:
        raise ValueError(f"unknown device classes {unknown} (known: {', '.join(DEVICE_CLASSES)})")
    if any(s <= 0 for s in slos_ms) or any(f <= 0 for f in fps):
        raise ValueError("SLOs and frame rates must be positive")
    rng = np.random.default_rng(seed)
    width = len(str(max(n - 1, 0)))
    out: list[Client] = []
    for i in range(n):
        trace = traces[int(rng.integers(len(traces)))]
        start = float(rng.uniform(0.0, trace.duration_s))
        out.append(Client(
            id=f"{id_prefix}{i:0{width}d}", model=models[int(rng.integers(len(models)))],
            device=device_classes[int(rng.integers(len(device_classes)))],
            slo_ms=float(slos_ms[int(rng.integers(len(slos_ms)))]), fps=float(fps[int(rng.integers(len(fps)))]),
            bandwidth_bps=trace.bandwidth_bps(start, window_s), trace=trace.name, start_s=start,
        ))
    return out


def clients_to_workload(profile: Profile, clients: Sequence[Client], *, mode: Mode = "latency",
                        **partitioner_kw: Any) -> Workload:
    """One fragment per client that has a feasible cut; the others rejected with the reason."""
    fragments: list[Fragment] = []
    rejected: list[Rejected] = []
    server_ms = _ServerTimes(profile)
    for c in clients:
        if c.model not in profile.models:
            rejected.append(Rejected(c.id, f"model {c.model!r} is not in the profile"))
            continue
        if c.bandwidth_bps <= 0:
            rejected.append(Rejected(c.id, f"no uplink capacity on {c.trace} at {c.start_s:.1f} s"))
            continue
        kw = partitioner_kw if "server_ms" in partitioner_kw else {**partitioner_kw, "server_ms": server_ms[c.model]}
        choice = choose_cut(profile.models[c.model], DEVICE_CLASSES[c.device], c.bandwidth_bps, c.slo_ms,
                            mode=mode, **kw)
        if choice is None:
            rejected.append(Rejected(c.id, f"no cut of {c.model} leaves the server time within {c.slo_ms:g} ms "
                                           f"on a {c.device} device at {c.bandwidth_bps / 1e6:.2f} Mbit/s"))
            continue
        fragments.append(Fragment(id=c.id, model=c.model, cut=choice.cut, rate_rps=c.fps,
                                  budget_ms=choice.budget_ms))
    return Workload(fragments, rejected)


class _ServerTimes:
    """The partitioner's default server estimate (batch 1, full share) per model and cut, computed once."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._by_model: dict[str, Callable[[int], float]] = {}

    def __getitem__(self, model: str) -> Callable[[int], float]:
        fn = self._by_model.get(model)
        if fn is None:
            mp = self.profile.models[model]
            full = max(mp.shares)
            times = [mp.suffix_latency(c, 1, full) for c in mp.cuts]
            fn = times.__getitem__
            self._by_model[model] = fn
        return fn


def load_traces(paths: Sequence[str]) -> list[LinkTrace]:
    return [LinkTrace.from_mahimahi(p) for p in paths]

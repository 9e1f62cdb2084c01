"""What a simulation reports: per group and overall SLO attainment, latency, batching and utilisation.

Only requests that arrive after the warm-up are counted (the system starts empty, which flatters it),
and utilisation is busy time inside the same window. After the last arrival the simulation drains,
so every counted request ends in exactly one of: in deadline, late, dropped early.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from common.contract.routing import GroupSpec
from common.simulation.traffic import Unserved


class Tally:
    """Running counts of one group (or of the whole plan, by :meth:`merge`)."""

    __slots__ = ("batched", "batches", "busy_s", "dropped", "in_deadline", "late", "latencies", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.in_deadline = 0
        self.late = 0
        self.dropped = 0
        self.latencies: list[float] = []  # seconds, served requests only
        self.batches = 0
        self.batched = 0
        self.busy_s = 0.0

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.in_deadline += other.in_deadline
        self.late += other.late
        self.dropped += other.dropped
        self.latencies.extend(other.latencies)
        self.batches += other.batches
        self.batched += other.batched
        self.busy_s += other.busy_s

    def outcome(self, window_s: float, replicas: int) -> Outcome:
        lat = np.asarray(self.latencies) * 1000.0
        p50, p95, p99 = ((float(x) for x in np.percentile(lat, [50, 95, 99])) if len(lat)
                         else (None, None, None))
        return Outcome(
            requests=self.requests, in_deadline=self.in_deadline, late=self.late, dropped=self.dropped,
            slo_attainment=self.in_deadline / self.requests if self.requests else None,
            p50_ms=p50, p95_ms=p95, p99_ms=p99,
            batches=self.batches, mean_batch=self.batched / self.batches if self.batches else None,
            utilisation=self.busy_s / (replicas * window_s) if replicas else 0.0,
            goodput_rps=self.in_deadline / window_s,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    requests: int
    in_deadline: int
    late: int  # served, but finished after the deadline (execution ran longer than predicted)
    dropped: int  # answered DEADLINE_EXCEEDED before running
    slo_attainment: float | None  # in_deadline / requests
    p50_ms: float | None  # server latency (arrival to finish) of served requests
    p95_ms: float | None
    p99_ms: float | None
    batches: int  # batches launched in the window
    mean_batch: float | None
    utilisation: float  # busy time / (replicas × window)
    goodput_rps: float  # requests finished in deadline per second


@dataclass(frozen=True, slots=True)
class GroupReport:
    id: str
    model: str
    cuts: tuple[int, ...]
    batch: int
    share: int
    replicas: int
    fragments: int
    offered_rps: float  # the workload's rate routed here (the plan's rate_rps is what it planned for)
    planned_rps: float
    planned_latency_ms: float
    outcome: Outcome

    @classmethod
    def of(cls, spec: GroupSpec, fragments: int, offered_rps: float, outcome: Outcome) -> GroupReport:
        return cls(spec.id, spec.model, spec.cuts, spec.batch, spec.share, spec.replicas, fragments,
                   offered_rps, spec.rate_rps, spec.latency_ms, outcome)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "outcome"}
        d["cuts"] = list(self.cuts)
        return {**d, **asdict(self.outcome)}


@dataclass(frozen=True)
class SimReport:
    settings: dict[str, Any]  # duration_s, warmup_s, seed, arrivals, noise_sigma, margin_ms
    plan: dict[str, Any]  # epoch, policy, profile, total_share, gpus
    groups: tuple[GroupReport, ...]
    overall: Outcome
    unserved: tuple[Unserved, ...] = field(default=())

    @property
    def unserved_rps(self) -> float:
        return sum(u.fragment.rate_rps for u in self.unserved)

    def group(self, gid: str) -> GroupReport:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings), "plan": dict(self.plan),
            "groups": [g.to_dict() for g in self.groups],
            "overall": asdict(self.overall),
            "unserved": [u.to_dict() for u in self.unserved], "unserved_rps": self.unserved_rps,
        }

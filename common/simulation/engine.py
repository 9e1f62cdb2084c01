"""Discrete-event simulation of a plan in virtual time (design.md section 9).

Each group is a shared EDF queue and ``replicas`` identical executors, like a consumer group on the
group's stream: whenever a replica is idle, the group's :class:`~common.batching.BatchPolicy` (the
workers' own code) decides on the queue. A launched batch runs for the profile's re-aligned latency of
its actual composition at the group's share, times an optional lognormal jitter (median 1) standing in
for execution noise the policy cannot foresee. A request's deadline is its arrival plus its fragment's
budget. Events are a heap of completions and policy wake-ups, merged with the pre-drawn arrivals.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from common.batching import BatchPolicy, EdfQueue, Pending, ProfileLatency
from common.contract.routing import GroupSpec
from common.planning.types import Fragment, PlanningError, workload_from_dict
from common.profiles import Profile, ProfileError
from common.simulation.report import GroupReport, SimReport, Tally
from common.simulation.traffic import SimulationError, arrival_times, assign

_NOISE_CHUNK = 4096
_PROGRESS_EVERY = 4096


class _Jitter:
    """Multiplicative lognormal factors with median 1, drawn in chunks (no per-batch numpy calls)."""

    def __init__(self, sigma: float, rng: np.random.Generator) -> None:
        self.sigma = sigma
        self._rng = rng
        self._left: list[float] = []

    def __call__(self) -> float:
        if self.sigma == 0.0:
            return 1.0
        if not self._left:
            self._left = np.exp(self.sigma * self._rng.standard_normal(_NOISE_CHUNK)).tolist()
        return self._left.pop()


class _Group:
    __slots__ = ("busy", "idle", "policy", "queue", "spec", "tally", "token")

    def __init__(self, spec: GroupSpec, policy: BatchPolicy) -> None:
        self.spec = spec
        self.policy = policy
        self.queue = EdfQueue()
        self.idle = list(range(spec.replicas - 1, -1, -1))  # pop() hands out replica 0 first
        self.tally = Tally()
        self.token = 0  # a wake-up is stale once the group has decided again since it was set


class _Loop:
    def __init__(self, groups: list[_Group], jitter: _Jitter, warmup_s: float, end_s: float) -> None:
        self.groups = groups
        self.jitter = jitter
        self.warmup_s = warmup_s
        self.end_s = end_s
        # (time, seq, group, replica or -1 for a wake-up, batch or token)
        self.heap: list[tuple[float, int, int, int, Any]] = []
        self.seq = 0

    def push(self, t: float, gi: int, replica: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, gi, replica, payload))

    def kick(self, gi: int, now: float) -> None:
        """Let the group's policy decide while it has an idle replica and something queued."""
        g = self.groups[gi]
        g.token += 1
        q, warm = g.queue, self.warmup_s
        while q and g.idle:
            d = g.policy.decide(q, now)
            q.apply(d)
            for p in d.drop:
                if p.arrival >= warm:
                    g.tally.dropped += 1
            if d.launch:
                replica = g.idle.pop()
                finish = now + d.predicted_s * self.jitter()
                if warm <= now < self.end_s:
                    g.tally.batches += 1
                    g.tally.batched += len(d.launch)
                g.tally.busy_s += max(0.0, min(finish, self.end_s) - max(now, warm))
                self.push(finish, gi, replica, d.launch)
                continue
            if d.drop and d.wait_s == 0.0:
                continue
            if d.wait_s is not None:
                self.push(now + d.wait_s, gi, -1, g.token)
            break

    def handle(self, event: tuple[float, int, int, int, Any]) -> None:
        t, _, gi, replica, payload = event
        g = self.groups[gi]
        if replica < 0:
            if payload == g.token:
                self.kick(gi, t)
            return
        g.idle.append(replica)
        tally = g.tally
        for p in payload:
            if p.arrival < self.warmup_s:
                continue
            tally.latencies.append(t - p.arrival)
            if t <= p.deadline:
                tally.in_deadline += 1
            else:
                tally.late += 1
        self.kick(gi, t)


def _fragments(workload: Mapping[str, Any] | Sequence[Fragment]) -> list[Fragment]:
    if isinstance(workload, Mapping):
        try:
            return workload_from_dict(workload)
        except PlanningError as exc:
            raise SimulationError(str(exc)) from None
    return list(workload)


def simulate(profile: Profile, plan: Mapping[str, Any], workload: Mapping[str, Any] | Sequence[Fragment], *,
             duration_s: float = 30.0, seed: int = 0, arrivals: str = "poisson", noise_sigma: float = 0.0,
             warmup_s: float = 1.0, margin_ms: float = 0.0, eager: bool = False,
             progress: Callable[[float], None] | None = None) -> SimReport:
    """Run ``plan`` against ``workload`` (a workload dict or fragments) on ``profile``; deterministic per seed.

    ``noise_sigma``: sigma of the lognormal execution jitter (0: runs take exactly the profiled time);
    ``margin_ms`` and ``eager``: the batching policy's settings (:class:`~common.batching.BatchPolicy`);
    ``progress``: called with the fraction of arrivals done.
    """
    if not (math.isfinite(duration_s) and 0.0 <= warmup_s < duration_s):
        raise SimulationError(f"need 0 <= warmup_s < duration_s, got {warmup_s} and {duration_s}")
    if not (math.isfinite(noise_sigma) and noise_sigma >= 0.0) or margin_ms < 0.0:
        raise SimulationError("noise_sigma and margin_ms must be finite and non-negative")
    fragments = _fragments(workload)
    routed = assign(plan, fragments)
    groups: list[_Group] = []
    for spec in routed.groups:
        try:
            latency = ProfileLatency(profile.model(spec.model), spec.share)
        except ProfileError as exc:
            raise SimulationError(f"group {spec.id!r}: {exc}") from None
        groups.append(_Group(spec, BatchPolicy(spec.batch, latency, margin_s=margin_ms / 1000.0, eager=eager)))

    served = [f for f in fragments if f.id in routed.group_of]
    arrive_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    times, owner = arrival_times([f.rate_rps for f in served], duration_s, arrive_rng, arrivals)
    loop = _Loop(groups, _Jitter(noise_sigma, noise_rng), warmup_s, duration_s)
    group_of = [routed.group_of[f.id] for f in served]
    cut_of = [f.cut for f in served]
    budget_s = [f.budget_ms / 1000.0 for f in served]
    heap, handle = loop.heap, loop.handle
    n = len(times)
    for i, (t, src) in enumerate(zip(times.tolist(), owner.tolist(), strict=True)):
        while heap and heap[0][0] <= t:
            handle(heapq.heappop(heap))
        gi = group_of[src]
        g = groups[gi]
        g.queue.add(Pending(str(i), cut_of[src], t + budget_s[src], t))
        if t >= warmup_s:
            g.tally.requests += 1
        if g.idle:
            loop.kick(gi, t)
        if progress is not None and i % _PROGRESS_EVERY == 0:
            progress(i / n)
    while heap:
        handle(heapq.heappop(heap))
    if progress is not None:
        progress(1.0)
    return _report(profile, plan, routed.groups, groups, served, group_of, routed.unserved, settings={
        "duration_s": duration_s, "warmup_s": warmup_s, "seed": seed, "arrivals": arrivals,
        "noise_sigma": noise_sigma, "margin_ms": margin_ms, "eager": eager, "profile_source": profile.source,
    })


def _report(profile: Profile, plan: Mapping[str, Any], specs: Sequence[GroupSpec], groups: list[_Group],
            served: list[Fragment], group_of: list[int], unserved: Any, settings: dict[str, Any]) -> SimReport:
    window_s = settings["duration_s"] - settings["warmup_s"]
    offered = [0.0] * len(groups)
    members = [0] * len(groups)
    for f, gi in zip(served, group_of, strict=True):
        offered[gi] += f.rate_rps
        members[gi] += 1
    total = Tally()
    reports = []
    for gi, (spec, g) in enumerate(zip(specs, groups, strict=True)):
        if g.queue or len(g.idle) != spec.replicas:
            raise SimulationError(f"group {spec.id!r} did not drain")  # an engine bug, never the plan's
        total.merge(g.tally)
        reports.append(GroupReport.of(spec, members[gi], offered[gi], g.tally.outcome(window_s, spec.replicas)))
    plan_info = {k: plan.get(k) for k in ("epoch", "policy", "profile", "total_share", "gpus")}
    return SimReport(settings=settings, plan=plan_info, groups=tuple(reports),
                     overall=total.outcome(window_s, sum(s.replicas for s in specs)), unserved=tuple(unserved))

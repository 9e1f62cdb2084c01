"""Load shedding: refuse a request now when its group's backlog already makes it miss its deadline.

A group of ``n`` replicas with max batch ``B`` and batch latency ``L`` drains ``n · B / L`` requests per
second. A request routed behind a backlog of ``q`` entries waits about ``q / rate`` before its own batch
starts, then takes up to ``L`` to run. When ``wait + L ≥ budget`` the request would only burn GPU time
and still miss, so the ingress answers ``OVERLOADED`` with ``retry_after_ms ≈ wait`` instead.

Only the backlog is grounds for shedding: a request whose budget is below ``L`` on an idle group is
routed anyway (a batch smaller than ``B`` runs faster than ``L``; the worker drops it explicitly if it
cannot make it). The backlog a decision sees is the last polled one plus what this ingress routed
since, so a burst inside one poll interval is counted too. Pure logic: the poller feeds it numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the plan promises for one group."""

    replicas: int
    batch: int
    latency_ms: float

    @property
    def rate_rps(self) -> float:
        """Requests per second the group drains at full batches (0 when the plan gives no latency)."""
        if self.replicas <= 0 or self.batch <= 0 or self.latency_ms <= 0:
            return 0.0
        return self.replicas * self.batch / (self.latency_ms / 1000.0)

    def wait_ms(self, backlog: float) -> float:
        """Predicted queueing time of a request that arrives behind ``backlog`` entries."""
        if backlog <= 0:
            return 0.0
        rate = self.rate_rps
        return math.inf if rate <= 0 else backlog / rate * 1000.0


@dataclass(frozen=True, slots=True)
class ShedDecision:
    shed: bool
    wait_ms: float
    retry_after_ms: int = 0


ROUTE = ShedDecision(False, 0.0)


def decide(capacity: Capacity, backlog: float, budget_ms: float, *, max_retry_ms: int = 60_000) -> ShedDecision:
    wait = capacity.wait_ms(backlog)
    if wait <= 0 or wait + capacity.latency_ms < budget_ms:
        return ShedDecision(False, wait)
    retry = max_retry_ms if math.isinf(wait) else min(max_retry_ms, max(1, math.ceil(wait)))
    return ShedDecision(True, wait, retry)


class Backlogs:
    """Per-group backlog: the last poll plus what this ingress routed since it."""

    def __init__(self) -> None:
        self._polled: dict[str, int] = {}
        self._routed: dict[str, int] = {}

    def mark(self) -> dict[str, int]:
        """Routed counts now; pass them to ``update`` with the poll issued right after."""
        return dict(self._routed)

    def update(self, polled: Mapping[str, int], since: Mapping[str, int] | None = None) -> None:
        """A fresh poll replaces the polled backlog; what was routed after ``since`` (the mark taken
        before the poll was sent) may be missing from it, so it stays counted (None: nothing does)."""
        self._polled = dict(polled)
        base = self._routed if since is None else since
        self._routed = {g: n - base.get(g, 0) for g, n in self._routed.items() if n > base.get(g, 0)}

    def routed(self, gid: str, n: int = 1) -> None:
        self._routed[gid] = self._routed.get(gid, 0) + n

    def backlog(self, gid: str) -> int:
        return self._polled.get(gid, 0) + self._routed.get(gid, 0)

    def snapshot(self) -> dict[str, int]:
        return {gid: self.backlog(gid) for gid in self._polled.keys() | self._routed.keys()}


class ShedPolicy:
    """Decides per request with the plan's capacities and the current backlogs."""

    def __init__(self, capacities: Mapping[str, Capacity], backlogs: Backlogs, *, max_retry_ms: int = 60_000) -> None:
        self.capacities = dict(capacities)
        self.backlogs = backlogs
        self.max_retry_ms = max_retry_ms

    def admit(self, gid: str, budget_ms: float) -> ShedDecision:
        """Decide for one request; an admitted request counts toward the backlog of later ones."""
        cap = self.capacities.get(gid)
        if cap is None:
            self.backlogs.routed(gid)
            return ROUTE
        decision = decide(cap, self.backlogs.backlog(gid), budget_ms, max_retry_ms=self.max_retry_ms)
        if not decision.shed:
            self.backlogs.routed(gid)
        return decision

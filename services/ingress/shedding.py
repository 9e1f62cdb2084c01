"""Admission at the edge: refuse now only what cannot finish in time (pure logic: the poller feeds it numbers).

What the ingress knows of a group, refreshed every few tens of milliseconds (``GroupSpeed``):

* ``replicas`` — live replicas serving its stream now (the registry, not the plan's promise);
* ``table_ms`` — the plan's ``L(b)`` for ``b = 1..B`` at the group's traffic mix (design section 2);
* ``factor`` — how much slower (or faster) the replicas run than that table says, from the latency
  ratios they measure on every batch (``measured / profile``, divided by the plan's own scale);
* the backlog ``q``: entries not yet acknowledged — undelivered plus pending, polled from the stream
  (so completions count the moment a replica acks), plus what this ingress routed since the poll.

A request joining behind ``q`` entries on ``n`` replicas of max batch ``B`` (eager batching: an idle
replica runs what is queued) finishes after ``⌊q/(n·B)⌋`` full batches ahead of it and its own batch
of ``min(q/n + 1, B)``: ``predict_ms``. It is routed when that, plus a margin for the reply leg, fits
its budget; otherwise it is answered ``OVERLOADED`` with ``retry_after_ms`` ≈ the time the backlog
needs to shrink enough. A budget below ``L(1)`` — the fastest run there is, alone on an idle replica —
can never be met, so a retry cannot help: ``DEADLINE_EXCEEDED`` at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

REPLY_MARGIN_MS = 2.0  # the reply's way back to the producer: one stream hop and the client's read


@dataclass(frozen=True, slots=True)
class GroupSpeed:
    replicas: int
    table_ms: tuple[float, ...]  # L(1..B) as planned
    factor: float = 1.0

    @property
    def batch(self) -> int:
        return len(self.table_ms)

    def latency_ms(self, b: float) -> float:
        """L(b) now: the planned table (linear between sizes) times the measured factor."""
        if not self.table_ms:
            return 0.0
        b = min(max(b, 1.0), float(self.batch))
        lo = math.floor(b)
        frac = b - lo
        base = self.table_ms[lo - 1] if frac == 0.0 or lo >= self.batch else (
            self.table_ms[lo - 1] * (1.0 - frac) + self.table_ms[lo] * frac)
        return base * self.factor

    def predict_ms(self, backlog: float) -> float:
        """When a request arriving behind ``backlog`` entries would be answered, from now."""
        n = max(1, self.replicas)
        per = max(0.0, backlog) / n
        rounds = math.floor(per / self.batch)
        own = min(per - rounds * self.batch + 1.0, float(self.batch))
        return rounds * self.latency_ms(self.batch) + self.latency_ms(own)

    def drain_rate_per_ms(self) -> float:
        """Entries the group finishes per millisecond when its batches are full."""
        full = self.latency_ms(self.batch)
        return max(1, self.replicas) * self.batch / full if full > 0 else math.inf


class Verdict(Enum):
    ROUTE = "route"
    SHED = "shed"  # OVERLOADED: the backlog is the reason, a retry later can succeed
    HOPELESS = "hopeless"  # DEADLINE_EXCEEDED: the budget is below the fastest possible run


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    predicted_ms: float
    retry_after_ms: int = 0


def decide(speed: GroupSpeed, backlog: float, budget_ms: float, *, margin_ms: float = REPLY_MARGIN_MS,
           max_retry_ms: int = 60_000) -> Decision:
    alone = speed.latency_ms(1)
    if budget_ms < alone + margin_ms:
        return Decision(Verdict.HOPELESS, alone)
    predicted = speed.predict_ms(backlog)
    if predicted + margin_ms <= budget_ms:
        return Decision(Verdict.ROUTE, predicted)
    # How long until the backlog is small enough for this budget: the excess over the drain rate.
    excess_ms = predicted + margin_ms - budget_ms
    rate = speed.drain_rate_per_ms()
    retry = excess_ms if math.isinf(rate) else max(excess_ms, 1.0)
    return Decision(Verdict.SHED, predicted, min(max_retry_ms, max(1, math.ceil(retry))))


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


def speed_factor(ratios: Sequence[float], plan_scale: float) -> float:
    """The factor between the replicas' measured speed and the plan's table: median ratio ÷ plan scale."""
    if not ratios:
        return 1.0
    ordered = sorted(ratios)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return median / plan_scale if plan_scale > 0 else median

"""Admission at the edge: refuse now only what cannot finish in time (pure logic: the poller feeds it numbers).

What the ingress knows of a group, refreshed every few tens of milliseconds (``GroupSpeed``):

* ``replicas`` — live replicas serving its stream now (the registry, not the plan's promise);
* ``table_ms`` — the plan's ``L(b)`` for ``b = 1..B`` at the group's traffic mix (design section 2);
* ``factor`` — how much slower (or faster) the replicas run than that table says, from the latency
  ratios they measure on every batch (``measured / profile``, divided by the plan's own scale);
* the backlog ``q``: entries not yet acknowledged — undelivered plus pending, polled from the stream
  (so completions count the moment a replica acks), plus what this ingress routed since the poll;
* ``drain_per_ms`` — while the group is saturated, how fast its replicas really finish entries
  (``DrainMeter``: the rate of the stream's acknowledged counter), None otherwise.

A request joining behind ``q`` entries on ``n`` replicas of max batch ``B`` (eager batching: an idle
replica runs what is queued) finishes after ``⌊q/(n·B)⌋`` full batches ahead of it and its own batch
of ``min(q/n + 1, B)``: ``predict_ms``. It is routed when that, plus a margin for the reply leg, fits
its budget; otherwise it is answered ``OVERLOADED`` with ``retry_after_ms`` ≈ the time the backlog
needs to shrink enough.

**A saturated group is judged by its measured drain.** The table times the compute ratio sees only
the batch's own compute; a group that runs flat out also pays the gap between batches, its reply
writes and a host slowed by everything else on it (the ingresses refusing a 5× overload are on the
same cores). While ``q`` holds at least ``SATURATED_BATCHES`` full batches per replica
(``saturated_backlog``), every replica runs full batches back to back, so the acknowledged counter
grows at the group's real capacity: each round ahead of a request and its own then costs
``n·B / drain``, or the table's ``L(B)`` if that is slower — and a saturated group's prediction is
multiplied by ``DRAIN_HEADROOM``, measured yet or not. The headroom is a target for the standing
queue: under overload the queue settles where admission stops, so without it every admitted request
would sit at the edge of its budget and any wobble of the host would make it miss (overload-5x,
500 ms budgets: 51–62% of admitted requests in budget at headroom 1); applied from the first
saturated poll, it also covers the first sample's wait (before it, 300 misses at the start of a
2.5× overload). It bounds a bias too: entries the replicas drop as expired are acknowledged as well,
so a group that was over-admitted looks faster than it is. Below saturation the meter says nothing
(the ack rate is then the arrival rate, not the capacity) and the table alone predicts.

A budget below ``L(1)`` — the fastest run there is, alone on an idle replica —
can never be met, so a retry cannot help: ``DEADLINE_EXCEEDED`` at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

REPLY_MARGIN_MS = 2.0  # the reply's way back to the producer: one stream hop and the client's read
SATURATED_BATCHES = 2  # full batches queued per live replica: the group runs flat out
DRAIN_HEADROOM = 2.0  # a saturated group's queue is held to 1/headroom of the budget (see above)
DRAIN_SAMPLE_MS = 200.0  # the drain is sampled over stretches this long...
DRAIN_ALPHA = 0.3  # ...and smoothed with this EWMA weight
DRAIN_FORGET_MS = 5_000.0  # a drain not re-measured for this long is stale


@dataclass(frozen=True, slots=True)
class GroupSpeed:
    replicas: int
    table_ms: tuple[float, ...]  # L(1..B) as planned
    factor: float = 1.0
    drain_per_ms: float | None = None  # measured while saturated (DrainMeter), None when not
    headroom: float = DRAIN_HEADROOM

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
        modelled = rounds * self.latency_ms(self.batch) + self.latency_ms(own)
        if not self.saturated(backlog):
            return modelled
        # Measured: the rounds ahead and the request's own, each n·B entries at the drain rate.
        measured = (rounds + 1) * n * self.batch / self.drain_per_ms if self.drain_per_ms else 0.0
        return self.headroom * max(modelled, measured)

    def saturated(self, backlog: float) -> bool:
        return backlog >= saturated_backlog(self.batch, self.replicas)

    def drain_rate_per_ms(self) -> float:
        """Entries the group finishes per millisecond when its batches are full (measured if it is)."""
        if self.drain_per_ms:
            return self.drain_per_ms
        full = self.latency_ms(self.batch)
        return max(1, self.replicas) * self.batch / full if full > 0 else math.inf


def saturated_backlog(batch: int, replicas: int) -> int:
    """The backlog from which a group of ``replicas`` × max batch ``batch`` runs flat out."""
    return SATURATED_BATCHES * max(1, batch) * max(1, replicas)


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
    # How long until the backlog is small enough for this budget: the excess over the drain rate (a
    # saturated group's prediction carries the headroom; the queue itself drains at the real pace).
    excess_ms = predicted + margin_ms - budget_ms
    if speed.saturated(backlog) and speed.headroom > 1.0:
        excess_ms /= speed.headroom
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


@dataclass(slots=True)
class _Stretch:
    t_ms: float  # the last sample
    acked: int  # the counter then
    rate: float | None = None  # EWMA of entries acknowledged per ms
    rate_ms: float = 0.0  # when the rate was last updated


class DrainMeter:
    """How fast each saturated group stream really drains, from its acknowledged counter (pure).

    ``update`` takes every backlog poll; a stream whose backlog is at least ``saturated_at`` is in a
    saturated stretch, and every ``sample_ms`` of it gives one rate sample ``Δacked / Δt``, smoothed.
    The stretch (and its rate) ends when the backlog falls below ``saturated_at``, when the counter
    goes back (the stream's group was re-created) or is unknown (Redis < 7.0), and the rate is not
    used once older than ``forget_ms``."""

    def __init__(self, *, sample_ms: float = DRAIN_SAMPLE_MS, alpha: float = DRAIN_ALPHA,
                 forget_ms: float = DRAIN_FORGET_MS) -> None:
        self.sample_ms, self.alpha, self.forget_ms = sample_ms, alpha, forget_ms
        self._stretch: dict[str, _Stretch] = {}

    def update(self, stream: str, backlog: int, acked: int | None, *, saturated_at: int, now_ms: float) -> None:
        st = self._stretch.get(stream)
        if acked is None or backlog < max(1, saturated_at) or (st is not None and acked < st.acked):
            self._stretch.pop(stream, None)
            return
        if st is None:
            self._stretch[stream] = _Stretch(now_ms, acked)
            return
        dt = now_ms - st.t_ms
        if dt < self.sample_ms:
            return
        sample = (acked - st.acked) / dt
        st.rate = sample if st.rate is None else (1.0 - self.alpha) * st.rate + self.alpha * sample
        st.t_ms, st.acked, st.rate_ms = now_ms, acked, now_ms

    def per_ms(self, stream: str, now_ms: float) -> float | None:
        """The stream's measured drain (entries per ms), None unless saturated and measured recently."""
        st = self._stretch.get(stream)
        if st is None or st.rate is None or st.rate <= 0 or now_ms - st.rate_ms > self.forget_ms:
            return None
        return st.rate

    def forget(self, streams: Iterable[str]) -> None:
        """Keep only ``streams`` (the plan's now): a retired stream's drain says nothing any more."""
        keep = set(streams)
        for stream in [s for s in self._stretch if s not in keep]:
            del self._stretch[stream]


def speed_factor(ratios: Sequence[float], plan_scale: float) -> float:
    """The factor between the replicas' measured speed and the plan's table: median ratio ÷ plan scale."""
    if not ratios:
        return 1.0
    ordered = sorted(ratios)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return median / plan_scale if plan_scale > 0 else median

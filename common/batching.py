"""Deadline-aware batching (design.md section 6): pure logic shared by the workers and the simulator.

A group's worker holds pending requests, each with an absolute deadline and a cut. At time ``now`` it
asks :meth:`BatchPolicy.decide` what to do, and the answer follows these rules:

1. **EDF** — requests are judged in order of deadline (ties: arrival, then id).
2. **Drop early** — a request that cannot finish by its deadline even if it ran alone, starting at the
   earliest moment the executor is free (``t0 + L({cut: 1}) > deadline``), is dropped; the caller
   answers it ``DEADLINE_EXCEEDED``. Keeping it would only spend a batch slot on a certain miss.
3. **Launch** when ``max_batch`` live requests are queued (full), or when the head's slack
   ``head.deadline − t0 − L(candidate)`` is at most ``margin_s``. ``L`` is the re-aligned latency of the
   batch that would launch, so its cut composition matters (design.md section 2).
4. **What launches** is the EDF prefix of ``max_batch`` when it finishes by the head's deadline. When
   it does not, and a full batch's worth is queued, the first window of ``max_batch`` consecutive live
   requests that finishes by its own first deadline launches; the requests it skips stay queued (a
   smaller batch may still serve them, or rule 2 drops them). This is Nexus's early drop, kept within
   rule 2: without it a backlog shrinks batches to what the oldest request can afford, and
   throughput collapses exactly when it is needed (in simulation: goodput at 2× overload fell to
   0.55× capacity instead of staying at capacity). Failing that, the longest EDF prefix that
   finishes by the head's deadline launches (the head alone always does, or rule 2 would have
   dropped it). Members finish together and none has an earlier deadline than the window's head, so
   the policy never knowingly launches a late request. The margin only moves launches earlier; it
   never shrinks a batch.
   "Finish" counts ``tail_s`` after the compute (the reply's write, which every request of a batch
   waits for): rules 2 and 4 judge ``t0 + tail_s`` against the deadlines, so a batch whose compute
   ends just at its head's deadline, with the reply still to write, is not knowingly launched late.
5. **Otherwise wait** ``wait_s`` — until the slack is down to the margin, or until a queued request
   would become a certain miss, whichever comes first. Waits are always positive: no busy spin.

``eager=True`` replaces rule 5 by "launch whatever is queued": a work-conserving executor
(Clipper/Nexus style). A reserved share idles anyway while it waits, so eager batching costs no GPU in
this model, only smaller batches at low load; in simulation it rides out Poisson bursts and execution
jitter a little better than waiting for the slack, which finishes slack-launched batches just at the
deadline.

The first ``max_batch`` live requests are examined, and more only to find a window under rule 4;
later ones are judged when they come near the front, which keeps a decision cheap on a long backlog.

Times are seconds on any clock, used consistently (the workers use the server's unix time, the
simulator its virtual time).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from common.profiles import ModelProfile

# Waits shorter than this are treated as "now": a timer that cannot advance a float clock would spin.
EPS_S = 1e-9
_CACHE_LIMIT = 1 << 16


@dataclass(frozen=True, slots=True)
class Pending:
    """One queued request, as the batching policy sees it."""

    req_id: str
    cut: int
    deadline: float  # absolute, seconds
    arrival: float  # absolute, seconds


class LatencyModel(Protocol):
    """Predicted seconds to run one re-aligned batch, given ``{cut: number of requests}`` (all > 0)."""

    def __call__(self, counts: Mapping[int, int]) -> float: ...


class ProfileLatency:
    """Re-aligned latency of a model's batches at one share, from a profile (ms → s, times ``scale``).

    Results are cached by batch composition: a group sees few distinct compositions, and the policy
    asks for the same ones again and again.
    """

    __slots__ = ("_cache", "model", "scale", "share")

    def __init__(self, model: ModelProfile, share: int, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"latency scale must be positive, got {scale}")
        model.share_index(share)  # a share off the grid fails here, not on the first batch
        self.model = model
        self.share = int(share)
        self.scale = float(scale)
        self._cache: dict[tuple[tuple[int, int], ...], float] = {}

    def __call__(self, counts: Mapping[int, int]) -> float:
        key = tuple(sorted((c, n) for c, n in counts.items() if n > 0))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        value = self.model.realigned_latency(dict(key), self.share) * self.scale / 1000.0
        self._cache[key] = value
        return value


def profile_latency(model: ModelProfile, share: int, scale: float = 1.0) -> LatencyModel:
    """The :class:`LatencyModel` of ``model`` at GPU share (or CPU threads) ``share``."""
    return ProfileLatency(model, share, scale)


@dataclass(slots=True)
class Decision:
    """What to do now.

    ``launch``: run these now, as one re-aligned batch (EDF order); ``drop``: answer these
    ``DEADLINE_EXCEEDED``; ``wait_s``: decide again after this many seconds at the latest (``0.0``:
    requests remain that could launch now on another executor; ``None``: nothing is left queued, wait
    for an arrival); ``predicted_s``: predicted run time of ``launch``.
    """

    launch: list[Pending] = field(default_factory=list)
    drop: list[Pending] = field(default_factory=list)
    wait_s: float | None = None
    predicted_s: float = 0.0


def edf_key(p: Pending) -> tuple[float, float, str]:
    return (p.deadline, p.arrival, p.req_id)


class EdfQueue:
    """Pending requests kept in EDF order (a sorted list: the policy reads the front in order).

    Ids are unique, so the order is total and the same as :func:`edf_key` gives a list. Insertion is
    an O(log n) search plus a memmove; removing what a decision launched and dropped is a single
    rebuild of the front of the list.
    """

    def __init__(self, items: Iterable[Pending] = ()) -> None:
        self._entries: list[tuple[float, float, str, Pending]] = []
        self._keys: dict[str, tuple[float, float, str]] = {}
        for p in items:
            self.add(p)

    def add(self, p: Pending) -> None:
        if p.req_id in self._keys:
            raise ValueError(f"request {p.req_id!r} is already queued")
        key = edf_key(p)
        self._keys[p.req_id] = key
        bisect.insort(self._entries, (*key, p))

    def _index(self, req_id: str) -> int | None:
        key = self._keys.get(req_id)
        return None if key is None else bisect.bisect_left(self._entries, key)

    def remove(self, req_id: str) -> Pending | None:
        i = self._index(req_id)
        if i is None:
            return None
        del self._keys[req_id]
        return self._entries.pop(i)[3]

    def discard(self, items: Iterable[Pending]) -> None:
        """Remove these requests (absent ones are ignored)."""
        gone: set[str] = set()
        last = -1
        for p in items:
            i = self._index(p.req_id)
            if i is not None:
                gone.add(p.req_id)
                last = max(last, i)
                del self._keys[p.req_id]
        if gone:
            front = self._entries[: last + 1]
            self._entries[: last + 1] = [e for e in front if e[3].req_id not in gone]

    def apply(self, decision: Decision) -> None:
        """Remove what ``decision`` launched or dropped."""
        self.discard([*decision.drop, *decision.launch])

    def peek(self) -> Pending | None:
        return self._entries[0][3] if self._entries else None

    def pop_batch(self, k: int) -> list[Pending]:
        """Take the ``k`` earliest-deadline requests."""
        batch = [e[3] for e in self._entries[:k]]
        del self._entries[:k]
        for p in batch:
            del self._keys[p.req_id]
        return batch

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._keys

    def __iter__(self) -> Iterator[Pending]:
        return (e[3] for e in self._entries)


class BatchPolicy:
    """The rules of the module docstring for one group: ``max_batch`` (the plan's B) and its latency."""

    def __init__(self, max_batch: int, latency: LatencyModel, *, margin_s: float = 0.0, tail_s: float = 0.0,
                 drop_early: bool = True, eager: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if margin_s < 0 or tail_s < 0:
            raise ValueError(f"margin_s and tail_s must be non-negative, got {margin_s}, {tail_s}")
        self.max_batch = int(max_batch)
        self.latency = latency
        self.margin_s = float(margin_s)
        self.tail_s = float(tail_s)
        self.drop_early = drop_early
        self.eager = eager
        self._alone: dict[int, float] = {}

    def alone_s(self, cut: int) -> float:
        """Predicted seconds for a batch of one request of ``cut``."""
        t = self._alone.get(cut)
        if t is None:
            t = self._alone[cut] = self.latency({cut: 1})
        return t

    def batch_s(self, batch: Sequence[Pending]) -> float:
        """Predicted seconds for ``batch`` run re-aligned."""
        counts: dict[int, int] = {}
        for p in batch:
            counts[p.cut] = counts.get(p.cut, 0) + 1
        return self.latency(counts)

    def decide(self, queue: Sequence[Pending] | EdfQueue, now: float, *,
               busy_until: float | None = None) -> Decision:
        """Decide at ``now`` for ``queue`` (any order; an :class:`EdfQueue` is read in place).

        ``busy_until``: the executor is busy until then, so nothing launches before it; drops are judged
        against that start time.
        """
        ordered = iter(queue if isinstance(queue, EdfQueue) else sorted(queue, key=edf_key))
        t0 = now if busy_until is None else max(now, busy_until)
        te = t0 + self.tail_s  # deadlines are judged for the compute plus what must follow it (the reply)
        live: list[Pending] = []
        drops: list[Pending] = []
        next_drop = float("inf")  # time until the first live request becomes a certain miss
        while len(live) < self.max_batch:
            nxt = self._next_live(ordered, te, drops)
            if nxt is None:
                break
            live.append(nxt[0])
            if nxt[1] >= 0:
                next_drop = min(next_drop, nxt[1])
        if not live:
            return Decision(drop=drops)
        if t0 - now > EPS_S:
            return Decision(drop=drops, wait_s=t0 - now)
        predicted = self.batch_s(live)
        if len(live) < self.max_batch and not self.eager:
            slack = live[0].deadline - t0 - predicted
            wait = min(slack - self.margin_s, next_drop)
            if wait > EPS_S:
                return Decision(drop=drops, wait_s=wait)
        batch = live
        if te + predicted > live[0].deadline:
            window = self._slide(list(live), ordered, te, drops) if len(live) == self.max_batch else None
            batch, predicted = window if window is not None else self._fit(live, te)
        left = len(queue) - len(drops) - len(batch)
        return Decision(launch=batch, drop=drops, wait_s=0.0 if left else None, predicted_s=predicted)

    def _next_live(self, ordered: Iterator[Pending], t0: float,
                   drops: list[Pending]) -> tuple[Pending, float] | None:
        """The next request that may still make its deadline, with its latest start − t0; the rest drop."""
        for p in ordered:
            if t0 >= p.deadline:
                drops.append(p)
                continue
            latest_start = p.deadline - self.alone_s(p.cut) - t0
            if latest_start < 0 and self.drop_early:
                drops.append(p)
                continue
            return p, latest_start
        return None

    def _slide(self, live: list[Pending], ordered: Iterator[Pending], t0: float,
               drops: list[Pending]) -> tuple[list[Pending], float] | None:
        """First window of ``max_batch`` consecutive live requests that finishes by its own head's deadline."""
        counts: dict[int, int] = {}
        for p in live:
            counts[p.cut] = counts.get(p.cut, 0) + 1
        i = 0
        while (nxt := self._next_live(ordered, t0, drops)) is not None:
            p, out = nxt[0], live[i]
            live.append(p)
            i += 1
            counts[out.cut] -= 1
            if not counts[out.cut]:
                del counts[out.cut]
            counts[p.cut] = counts.get(p.cut, 0) + 1
            took = self.latency(counts)
            if t0 + took <= live[i].deadline:
                return live[i:], took
        return None

    def _fit(self, live: list[Pending], t0: float) -> tuple[list[Pending], float]:
        """Longest EDF prefix of ``live`` finishing by the head's deadline (else the head alone)."""
        prefix_s: list[float] = []
        counts: dict[int, int] = {}
        for p in live[:-1]:
            counts[p.cut] = counts.get(p.cut, 0) + 1
            prefix_s.append(self.latency(counts))
        for k in range(len(prefix_s), 0, -1):
            if t0 + prefix_s[k - 1] <= live[0].deadline:
                return live[:k], prefix_s[k - 1]
        return live[:1], self.alone_s(live[0].cut)

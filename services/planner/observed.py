"""What the planner knows of live traffic: windowed per-fragment rates and budgets (pure, no Redis).

Ingress processes report counts per ``(model, cut)`` every second. The planner keeps a sliding window
of those reports, turns them into a workload (rate = requests / window, budget = a low percentile of
the budgets seen, so a fragment's tight clients are covered) and decides whether it drifted far
enough from the workload the current plan was made for to justify a new epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FragmentKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Observation:
    ts: float
    window_s: float
    model: str
    cut: int
    count: int
    min_budget_ms: float
    p50_budget_ms: float


def parse_stats(msg: Mapping[str, Any]) -> list[Observation]:
    """Observations from one ingress stats message; malformed entries are skipped, never fatal."""
    out: list[Observation] = []
    try:
        ts, window = float(msg["ts"]), float(msg.get("window_s", 1.0))
    except (KeyError, TypeError, ValueError):
        return out
    for f in msg.get("fragments", []) or []:
        try:
            out.append(Observation(ts, window, str(f["model"]), int(f["cut"]), int(f["count"]),
                                   float(f["min_budget_ms"]), float(f.get("p50_budget_ms", f["min_budget_ms"]))))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class TrafficWindow:
    """Sliding window of observations; ``workload()`` gives the fragments the planner should serve."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._obs: deque[Observation] = deque()
        self._first_ts: float | None = None

    def add(self, observations: Iterable[Observation]) -> None:
        for o in observations:
            if self._first_ts is None or o.ts - o.window_s < self._first_ts:
                self._first_ts = o.ts - o.window_s
            self._obs.append(o)

    def expire(self, now: float) -> None:
        while self._obs and self._obs[0].ts < now - self.window_s:
            self._obs.popleft()

    def span_s(self, now: float) -> float:
        """Seconds of traffic the window covers (shorter than ``window_s`` right after start)."""
        if self._first_ts is None:
            return self.window_s
        return max(1.0, min(self.window_s, now - self._first_ts))

    def fragments(self, now: float) -> dict[FragmentKey, tuple[float, float]]:
        """``(model, cut) -> (rate_rps, budget_ms)`` over the window."""
        self.expire(now)
        span = self.span_s(now)
        counts: dict[FragmentKey, int] = {}
        budgets: dict[FragmentKey, float] = {}
        for o in self._obs:
            k = (o.model, o.cut)
            counts[k] = counts.get(k, 0) + o.count
            budgets[k] = min(budgets.get(k, o.min_budget_ms), o.min_budget_ms)
        return {k: (counts[k] / span, budgets[k]) for k in counts if counts[k] > 0}


def build_workload(observed: Mapping[FragmentKey, tuple[float, float]], served: Mapping[str, int], *,
                   floor_rps: float, default_budget_ms: float) -> dict[str, Any]:
    """Workload for the planner: observed fragments plus every other cut of each served model at a small
    floor rate, so any ``(model, cut)`` a device may switch to is always routable."""
    frags: list[dict[str, Any]] = []
    for model, n_blocks in sorted(served.items()):
        seen_budgets = [b for (m, _c), (_r, b) in observed.items() if m == model]
        fallback = min(seen_budgets) if seen_budgets else default_budget_ms
        for cut in range(n_blocks):
            rate, budget = observed.get((model, cut), (0.0, fallback))
            frags.append({"id": f"{model}:{cut}", "model": model, "cut": cut,
                          "rate_rps": round(max(rate, floor_rps), 4), "budget_ms": round(budget, 3)})
    return {"fragments": frags}


def drift(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], *, floor_rps: float) -> float:
    """Largest relative change of any fragment's rate (or a budget tightening), 0 when identical.

    Rates at the floor are compared as the floor, so noise in unused cuts never triggers a re-plan.
    """
    def index(frags: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
        return {str(f["id"]): (max(float(f["rate_rps"]), floor_rps), float(f["budget_ms"])) for f in frags}

    a, b = index(old), index(new)
    worst = 0.0
    for fid in set(a) | set(b):
        ra, ba = a.get(fid, (floor_rps, float("inf")))
        rb, bb = b.get(fid, (floor_rps, float("inf")))
        worst = max(worst, abs(rb - ra) / max(ra, floor_rps))
        if bb < ba:  # a tighter budget can make the current plan miss deadlines
            worst = max(worst, (ba - bb) / max(bb, 1e-9) if ba != float("inf") else 1.0)
    return worst

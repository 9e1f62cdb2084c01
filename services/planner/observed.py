"""What the planner knows of live traffic: windowed rates per fragment and budget class (pure, no Redis).

Ingress processes report, every second, counts per ``(model, cut)`` split into geometric *budget
classes* (``budgets: [[min_budget_ms, count], ...]``, see ``services/ingress/stats.py``). The planner
keeps a sliding window of those reports and turns it into a workload: one fragment per ``(model,
cut, budget class)`` with its rate and the class's tightest budget. Planning then merges classes
where that is cheaper (``common.planning.merge.split_budget_classes``) and sets a hopeless one
aside, so one client with an impossible budget never decides what everybody else at its cut gets.

Only cuts with traffic are planned: a cut nobody uses costs nothing and makes no group's batch look
like it runs the whole model. A request at a cut the plan has not seen is still routed (to the group
of its model starting nearest below it; every replica holds its whole model) and shows up in the
next window. Before any traffic, the bootstrap workload lists every cut at a nominal rate.

``drift`` says whether traffic moved far enough from the workload the current plan was made for:
the largest relative change of a ``(model, cut)`` rate, ignoring changes below a noise floor
(``max(floor_rps, 5%`` of the model's rate``)``), or a new tighter budget class that carries a
material part of a cut's traffic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.admission import budget_class

FragmentKey = tuple[str, int, float]  # model, cut, the budget class's tightest budget (ms)
MATERIAL = 0.05  # a share of a model's (or a cut's) traffic below this is noise for drift


@dataclass(frozen=True, slots=True)
class Observation:
    ts: float
    window_s: float
    model: str
    cut: int
    budgets: tuple[tuple[float, int], ...]  # (class min budget ms, count)

    @property
    def count(self) -> int:
        return sum(n for _, n in self.budgets)


def _classes(f: Mapping[str, Any]) -> tuple[tuple[float, int], ...]:
    raw = f.get("budgets")
    if isinstance(raw, list) and raw:
        out = []
        for item in raw:
            if isinstance(item, list | tuple) and len(item) == 2:
                out.append((float(item[0]), int(item[1])))
        if out:
            return tuple(out)
    return ((float(f["min_budget_ms"]), int(f["count"])),)  # an older ingress: one class per cut


def parse_stats(msg: Mapping[str, Any]) -> list[Observation]:
    """Observations from one ingress stats message; malformed entries are skipped, never fatal."""
    out: list[Observation] = []
    try:
        ts, window = float(msg["ts"]), float(msg.get("window_s", 1.0))
    except (KeyError, TypeError, ValueError):
        return out
    for f in msg.get("fragments", []) or []:
        try:
            budgets = tuple((b, n) for b, n in _classes(f) if n > 0 and b > 0)
            out.append(Observation(ts, window, str(f["model"]), int(f["cut"]), budgets))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class TrafficWindow:
    """Sliding window of observations; ``fragments()`` gives what the planner should serve."""

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

    def fragments(self, now: float) -> dict[FragmentKey, float]:
        """``(model, cut, class budget) -> rate_rps`` over the window; a class's budget is the tightest
        seen in it (classes are keyed by their geometric bucket, reported by their minimum)."""
        self.expire(now)
        span = self.span_s(now)
        counts: dict[tuple[str, int, int], int] = {}
        floors: dict[tuple[str, int, int], float] = {}
        for o in self._obs:
            for budget, n in o.budgets:
                k = (o.model, o.cut, budget_class(budget))
                counts[k] = counts.get(k, 0) + n
                floors[k] = min(floors.get(k, budget), budget)
        return {(m, c, floors[(m, c, b)]): counts[(m, c, b)] / span for (m, c, b) in counts if counts[(m, c, b)] > 0}


def build_workload(observed: Mapping[FragmentKey, float], served: Mapping[str, int], *,
                   bootstrap_rps: float = 0.0, default_budget_ms: float = 200.0) -> dict[str, Any]:
    """Workload for the planner: the observed fragments of served models; a served model without any
    traffic gets every cut at ``bootstrap_rps`` (0: none), so it is served before anyone asks."""
    frags: list[dict[str, Any]] = []
    for model, n_blocks in sorted(served.items()):
        mine = sorted((c, b, r) for (m, c, b), r in observed.items() if m == model)
        if not mine and bootstrap_rps > 0:
            mine = [(c, default_budget_ms, bootstrap_rps) for c in range(n_blocks)]
        for cut, budget, rate in mine:
            if not 0 <= cut < n_blocks:
                continue
            frags.append({"id": f"{model}:{cut}:{budget:g}", "model": model, "cut": cut,
                          "rate_rps": round(rate, 4), "budget_ms": round(budget, 3)})
    return {"fragments": frags}


def _by_cut(frags: Sequence[Mapping[str, Any]]) -> tuple[dict[tuple[str, int], float], dict[str, float],
                                                         dict[tuple[str, int], list[tuple[float, float]]]]:
    rates: dict[tuple[str, int], float] = {}
    model_rates: dict[str, float] = {}
    classes: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for f in frags:
        k = (str(f["model"]), int(f["cut"]))
        r, b = float(f["rate_rps"]), float(f["budget_ms"])
        rates[k] = rates.get(k, 0.0) + r
        model_rates[k[0]] = model_rates.get(k[0], 0.0) + r
        classes.setdefault(k, []).append((b, r))
    return rates, model_rates, classes


def drift(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], *, floor_rps: float) -> float:
    """How far ``new`` traffic is from the ``old`` workload: 0 when alike, > 0 the larger the change."""
    ra, ma, ca = _by_cut(old)
    rb, mb, cb = _by_cut(new)
    worst = 0.0
    for k in set(ra) | set(rb):
        a, b = ra.get(k, 0.0), rb.get(k, 0.0)
        noise = max(floor_rps, MATERIAL * max(ma.get(k[0], 0.0), mb.get(k[0], 0.0)))
        if abs(b - a) > noise:
            worst = max(worst, abs(b - a) / max(a, noise))
        # a tighter budget class with a material part of this cut's traffic can make the plan miss
        tight_old = min((bud for bud, _ in ca.get(k, [])), default=float("inf"))
        for bud, rate in cb.get(k, []):
            if bud < tight_old / 1.25 and rate > max(floor_rps, MATERIAL * b):
                worst = max(worst, (tight_old - bud) / bud if tight_old != float("inf") else 1.0)
    return worst

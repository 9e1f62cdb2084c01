"""Per-fragment statistics the planner plans from: counts and budgets per ``(model, cut)`` per window.

Every valid request counts toward its fragment, routed or shed: shed requests are demand the plan
failed to serve, and hiding them would make the planner size groups for the load it already turns
away. Budgets are also counted in geometric *budget classes* (each ``common.admission.BUDGET_RATIO`` wide, with the
exact minimum of each), so the planner can serve one ``(model, cut)`` as several budget classes — and
set a hopeless class aside — instead of letting its tightest client decide for all
(``budgets: [[min_budget_ms, count], ...]``). A bounded uniform sample (reservoir) per fragment gives
the median, so a flood cannot grow memory. ``flush`` returns the body of one ``stats`` message
(runtime contract) and starts the next window.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from common.admission import budget_class

SAMPLE_CAP = 2048


@dataclass(slots=True)
class _Fragment:
    count: int = 0
    min_budget_ms: float = math.inf
    sample: list[float] = field(default_factory=list)
    classes: dict[int, list[float]] = field(default_factory=dict)  # class -> [min budget, count]


class StatsWindow:
    def __init__(self, ingress: str, start: float, *, sample_cap: int = SAMPLE_CAP, seed: int = 0) -> None:
        self.ingress = ingress
        self.start = start
        self.sample_cap = sample_cap
        self._rng = random.Random(seed)
        self._fragments: dict[tuple[str, int], _Fragment] = {}
        self.accepted = 0
        self.shed = 0
        self.rejected: Counter[str] = Counter()

    def _observe(self, model: str, cut: int, budget_ms: float) -> None:
        frag = self._fragments.get((model, cut))
        if frag is None:
            frag = self._fragments[(model, cut)] = _Fragment()
        frag.count += 1
        frag.min_budget_ms = min(frag.min_budget_ms, budget_ms)
        cls = frag.classes.get(k := budget_class(budget_ms))
        if cls is None:
            frag.classes[k] = [budget_ms, 1.0]
        else:
            cls[0] = min(cls[0], budget_ms)
            cls[1] += 1
        if len(frag.sample) < self.sample_cap:
            frag.sample.append(budget_ms)
        else:
            # Algorithm R: each of the ``count`` budgets seen stays in the sample with equal probability.
            slot = self._rng.randrange(frag.count)
            if slot < self.sample_cap:
                frag.sample[slot] = budget_ms

    def record_routed(self, model: str, cut: int, budget_ms: float) -> None:
        self.accepted += 1
        self._observe(model, cut, budget_ms)

    def record_shed(self, model: str, cut: int, budget_ms: float) -> None:
        self.shed += 1
        self._observe(model, cut, budget_ms)

    def record_rejected(self, code: str) -> None:
        self.rejected[code] += 1

    def flush(self, now: float) -> dict[str, Any]:
        """The ``stats`` message body for the window ending at ``now``; the next window starts there."""
        fragments = [
            {"model": model, "cut": cut, "count": f.count, "min_budget_ms": f.min_budget_ms,
             "p50_budget_ms": float(statistics.median(f.sample)),
             "budgets": [[c[0], int(c[1])] for _, c in sorted(f.classes.items())]}
            for (model, cut), f in sorted(self._fragments.items())
        ]
        body: dict[str, Any] = {
            "ingress": self.ingress, "ts": now, "window_s": max(0.0, now - self.start),
            "fragments": fragments, "accepted": self.accepted, "rejected": dict(self.rejected),
            "shed": self.shed,
        }
        self.start = now
        self._fragments = {}
        self.accepted = self.shed = 0
        self.rejected = Counter()
        return body

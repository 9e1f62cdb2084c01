"""Feeding the replicas' measured latency back into the plan (pure: no Redis).

Every replica corrects its own predictions online (``services/worker/latency.py``) and reports the
correction in its heartbeat as ``latency: {"source", "ratio"}``. With ``source == "profile"`` the
ratio is ``measured / profile prediction`` against the *unscaled* profile the replica loads itself
(``"online"`` means it runs a work model, so its ratio says nothing about the profile). When a host is
slower (or faster) than its profile, the planner plans with a profile whose latencies for that model
are multiplied by a factor:

* per model, the median ratio over the replicas of the current epoch that predict from the profile
  and have run at least ``min_batches`` batches (so one fresh replica's first guesses do not count);
* hysteresis: a model is re-calibrated only when its observed ratio is outside
  ``[applied / band, applied × band]`` (``band`` 1.25), i.e. ``observed / applied`` left the band;
* the new factor is ``applied × (observed / applied)``, i.e. the observed ratio itself (replicas
  measure against the unscaled profile, so the ratio is absolute and factors never compound), clamped
  to ``[min_factor, max_factor]`` (0.25 .. 8);
* persistence: one reading outside the band proves nothing on a noisy host. ``decide`` records each
  reading and proposes only when every reading of a model in the last ``window_s`` (at least
  ``min_readings`` of them) lies outside the band *on the same side*, and then proposes their median;
* dwell: after a model's factor changed, it stays for ``dwell_s`` whatever the readings say, so a
  noisy host does not re-plan every few seconds (plans used to change in the middle of measurements).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from common.contract.routing import PlanView

MIN_BATCHES = 20
BAND = 1.25
MIN_FACTOR = 0.25
MAX_FACTOR = 8.0
WINDOW_S = 10.0
MIN_READINGS = 3
DWELL_S = 60.0


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def observed_ratios(statuses: Iterable[Any], plan: PlanView, *, min_batches: int = MIN_BATCHES) -> dict[str, float]:
    """Median ``latency.ratio`` per model over usable replica heartbeats of ``plan``'s epoch.

    A status counts when it is a mapping with ``epoch`` equal to the plan's, a ``group`` of the plan,
    ``batches >= min_batches`` and ``latency == {"source": "profile", "ratio": r}`` with ``r > 0``
    finite; anything else (other epochs, online models, garbage) is skipped.
    """
    by_model: dict[str, list[float]] = {}
    for s in statuses:
        if not isinstance(s, Mapping):
            continue
        epoch, batches = _num(s.get("epoch")), _num(s.get("batches"))
        if epoch is None or int(epoch) != epoch or int(epoch) != plan.epoch:
            continue
        if batches is None or batches < min_batches:
            continue
        group = s.get("group")
        spec = plan.groups.get(group) if isinstance(group, str) else None
        lat = s.get("latency")
        if spec is None or not isinstance(lat, Mapping) or lat.get("source") != "profile":
            continue
        ratio = _num(lat.get("ratio"))
        if ratio is None or ratio <= 0:
            continue
        by_model.setdefault(spec.model, []).append(ratio)
    return {m: float(statistics.median(v)) for m, v in by_model.items()}


class Calibration:
    """The latency factors the plan applies per model, and when to change them."""

    def __init__(self, applied: Mapping[str, float] | None = None, *, min_batches: int = MIN_BATCHES,
                 band: float = BAND, min_factor: float = MIN_FACTOR, max_factor: float = MAX_FACTOR,
                 window_s: float = WINDOW_S, min_readings: int = MIN_READINGS, dwell_s: float = DWELL_S) -> None:
        if band <= 1.0 or not 0 < min_factor <= 1.0 <= max_factor:
            raise ValueError("calibration needs band > 1 and 0 < min_factor <= 1 <= max_factor")
        self.min_batches, self.band = min_batches, band
        self.min_factor, self.max_factor = min_factor, max_factor
        self.window_s, self.min_readings, self.dwell_s = window_s, min_readings, dwell_s
        self.applied: dict[str, float] = {}
        self._readings: dict[str, list[tuple[float, float]]] = {}
        self._changed_at: dict[str, float] = {}
        self.restore(applied or {})

    def clamp(self, factor: float) -> float:
        return min(self.max_factor, max(self.min_factor, factor))

    def restore(self, factors: Any, models: Iterable[str] | None = None) -> None:
        """Take factors from a stored plan's ``latency_scale`` (garbage and unknown models skipped)."""
        keep = None if models is None else set(models)
        self.applied = {}
        if isinstance(factors, Mapping):
            for m, f in factors.items():
                v = _num(f)
                if isinstance(m, str) and v is not None and v > 0 and (keep is None or m in keep):
                    self.applied[m] = self.clamp(v)

    def factor(self, model: str) -> float:
        return self.applied.get(model, 1.0)

    def _side(self, model: str, ratio: float) -> int:
        """-1 faster than the band, +1 slower, 0 inside it."""
        relative = ratio / self.factor(model)
        return 0 if 1.0 / self.band <= relative <= self.band else (1 if relative > self.band else -1)

    def propose(self, observed: Mapping[str, float], now: float | None = None) -> dict[str, float] | None:
        """Record ``observed`` ratios at ``now``; the new factors (every model's, changed or not) when a
        model has been off the band on one side for the whole window and is past its dwell, else None.
        ``now`` None judges this one reading alone (no persistence, no dwell)."""
        new = dict(self.applied)
        changed = False
        for model, ratio in observed.items():
            if now is None:
                readings = [ratio]
            else:
                history = self._readings.setdefault(model, [])
                history.append((now, ratio))
                history[:] = [(t, r) for t, r in history if t >= now - self.window_s]
                if now - self._changed_at.get(model, -math.inf) < self.dwell_s:
                    continue
                readings = [r for _, r in history]
                if len(readings) < self.min_readings or history[0][0] > now - self.window_s * 0.5:
                    continue  # not enough readings, or not spread over the window yet
            sides = {self._side(model, r) for r in readings}
            if len(sides) != 1 or 0 in sides:
                continue
            factor = self.clamp(float(statistics.median(readings)))
            if abs(factor - self.factor(model)) > 1e-9 * self.factor(model):
                new[model], changed = factor, True
        return new if changed else None

    def decide(self, statuses: Iterable[Any], plan: PlanView, now: float | None = None) -> dict[str, float] | None:
        """``propose`` on the ratios observed in ``statuses`` for ``plan``."""
        return self.propose(observed_ratios(statuses, plan, min_batches=self.min_batches), now)

    def apply(self, factors: Mapping[str, float], now: float | None = None) -> None:
        for m, f in factors.items():
            if abs(self.clamp(float(f)) - self.factor(m)) > 1e-12:
                self._changed_at[m] = now if now is not None else -math.inf
                self._readings.pop(m, None)
        self.applied = {m: self.clamp(float(f)) for m, f in factors.items()}

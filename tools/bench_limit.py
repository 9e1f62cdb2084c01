"""The compute limit: torch alone running back-to-back batches of a cut mix on every core, no serving.

What the hardware could give a serving system on this workload, measured in the same run as the
system itself (this host's speed drifts by tens of percent within minutes, so only ratios taken side
by side mean anything):

* **re-aligned** — one batch of ``B`` requests mixing the cuts in equal parts, each joining at its own
  cut (design section 2); the unit time is the batch's, ``L(B)``;
* **per-cut** — a batch of ``B`` requests of one cut, for each cut in turn: the unit time is the
  whole cycle (``Σ_c L_c(B)``, ``B`` requests of every cut served), because a request of one cut
  waits for the other cuts' batches on the same cores, as per-cut serving time-slices them.

For each kind the limit is the best throughput ``requests per unit / unit time`` over the batch sizes
whose ``2 × unit time`` fits the budget: a request may wait for the unit in flight, then run in the
next (the feasibility rule of design section 4).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from common.model.executor import FragmentRunner

BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass(frozen=True)
class Limit:
    kind: str  # "realigned" or "per-cut"
    budget_ms: float
    batch: int  # per unit: the re-aligned batch, or each cut's batch in the cycle
    unit_ms: float
    rps: float


def _median_ms(runner: FragmentRunner, items: list[tuple[int, Any]], repeats: int) -> float:
    runner.run_numpy(items)  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.run_numpy(items)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def unit_times(model: str, resolution: int | None, cuts: Sequence[int], *, threads: int, repeats: int = 7,
               batches: Sequence[int] = BATCHES, seed: int = 0) -> dict[str, dict[int, float]]:
    """``{"realigned": {B: ms}, "per-cut": {B: cycle ms}}`` measured now on ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runner = FragmentRunner(model, 0, resolution=resolution, seed=seed)
        rng = np.random.default_rng(seed)
        inputs = {c: rng.standard_normal(runner.info.cut_shape(c)).astype(np.float32) for c in cuts}
        realigned: dict[int, float] = {}
        per_cut: dict[int, float] = {}
        for b in batches:
            mix = [(cuts[i % len(cuts)], inputs[cuts[i % len(cuts)]]) for i in range(b)]
            realigned[b] = _median_ms(runner, mix, repeats)
            per_cut[b] = sum(_median_ms(runner, [(c, inputs[c])] * b, repeats) for c in cuts)
        return {"realigned": realigned, "per-cut": per_cut}
    finally:
        torch.set_num_threads(old)


def best_limit(units: dict[str, dict[int, float]], n_cuts: int, budget_ms: float) -> dict[str, Limit | None]:
    out: dict[str, Limit | None] = {}
    for kind, table in units.items():
        per_unit = 1 if kind == "realigned" else n_cuts
        best: Limit | None = None
        for b, ms in table.items():
            if 2.0 * ms > budget_ms or ms <= 0:
                continue
            rps = b * per_unit / (ms / 1000.0)
            if best is None or rps > best.rps:
                best = Limit(kind, budget_ms, b, ms, rps)
        out[kind] = best
    return out


def limits_dict(limits: dict[str, Limit | None]) -> dict[str, Any]:
    return {k: (asdict(v) if v is not None else None) for k, v in limits.items()}

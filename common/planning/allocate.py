"""Step 3 of planning: choose ``(B, g, n)`` for a group by search over the profile grid (design.md §4).

For a group with per-cut rates ``Λ_c`` (total ``Λ``) and tightest budget ``T`` the search evaluates
every integer batch ``B`` in ``1..max grid batch`` at every grid share ``g`` at once:

    L(B, g)  re-aligned latency at the expected composition n_c = B·Λ_c/Λ (section 2); a block range
             whose expected batch is below one request runs in only that fraction of the batches
             and is weighted so (``profiles.below_one``)
    feasible 2·L(B, g) <= T
    n        max(1, ceil(Λ/ρ · L/B))        (L in seconds; a group always holds one replica)
    cost     n · g

and keeps the cheapest, breaking ties by fewer replicas, then the larger batch (headroom for bursts
at no cost), then lower latency.
Taking every ``B`` rather than only the largest feasible one per share costs nothing extra here and
never does worse, also on profiles whose per-request time ``L/B`` is not monotone.

Speed matters (the planner evaluates thousands of candidate groups). Between two consecutive member
cuts every block sees the same batch ``B·F`` (``F``: fraction of the batch that has joined), so every
block of that range sits on the same interpolation segment, and the range's latency is a difference
of prefix sums over blocks: ``L`` costs O(#cuts) array work per group instead of O(#blocks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.profiles import ModelProfile, below_one

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Replica counts are ceilings of floating-point quotients; a quotient that is an integer up to
# rounding must not cost one more replica.
CEIL_SLACK = 1e-9


@dataclass(frozen=True, slots=True)
class Allocation:
    batch: int
    share: int
    replicas: int
    latency_ms: float

    @property
    def cost(self) -> int:
        return self.replicas * self.share


class GroupAllocator:
    """``(B, g, n)`` search for groups of one model, with the latency tables that make it fast."""

    def __init__(self, model: ModelProfile, rho: float) -> None:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"utilisation cap rho must be in (0, 1], got {rho}")
        self.model = model
        self.rho = rho
        self.n_blocks = model.n_blocks
        grid = np.asarray(model.batches, dtype=np.float64)
        self._grid = grid
        self._inner = grid[1:-1]  # searchsorted over these gives the segment index directly
        self.max_batch = int(model.batches[-1])
        self.batch_sizes = np.arange(1, self.max_batch + 1, dtype=np.float64)
        self.per_batch = 1.0 / self.batch_sizes[:, None]
        self.shares = np.asarray(model.shares, dtype=np.int64)
        self._share_f = self.shares.astype(np.float64)
        t = model.table  # (blocks, grid batches, shares)
        if len(grid) > 1:
            base = t[:, :-1, :]
            slope = (t[:, 1:, :] - t[:, :-1, :]) / np.diff(grid)[None, :, None]
        else:
            base, slope = t, np.zeros_like(t)
        # prefix sums over blocks, value and slope side by side: P[c] = Σ_{j<c}
        both = np.concatenate([base, slope], axis=2)
        self._prefix = np.concatenate([np.zeros((1, *both.shape[1:])), np.cumsum(both, axis=0)])
        self._range_table: FloatArray | None = None
        self._suffix_cache: dict[int, FloatArray] = {}
        self._cache: dict[tuple[tuple[tuple[int, float], ...], float], Allocation | None] = {}

    # ------------------------------------------------------------------------------------- latency

    def latency_grid(self, cut_rates: Mapping[int, float]) -> FloatArray:
        """L(B, g) in ms, shape (max batch, shares), for B = 1..max batch at the expected composition."""
        cuts = sorted(c for c, r in cut_rates.items() if r > 0)
        if not cuts:  # total rate 0: every member cut counts equally
            cuts = sorted(cut_rates)
            weights = np.ones(len(cuts))
        else:
            weights = np.array([cut_rates[c] for c in cuts], dtype=np.float64)
        if len(cuts) == 1:
            return self.suffix_grid(cuts[0])
        lo = np.asarray(cuts, dtype=np.int64)
        hi = np.append(lo[1:], self.n_blocks)
        joined = np.cumsum(weights)
        joined /= joined[-1]
        return self._ranges_latency(lo, hi, joined)

    def suffix_grid(self, cut: int) -> FloatArray:
        """L(B, g) of a group whose requests all start at ``cut`` (cached: it does not depend on rates)."""
        grid = self._suffix_cache.get(cut)
        if grid is None:
            self.model.check_cut(cut)
            grid = self._ranges_latency(np.array([cut]), np.array([self.n_blocks]), np.ones(1))
            self._suffix_cache[cut] = grid
        return grid

    def _ranges_latency(self, lo: IntArray, hi: IntArray, joined: FloatArray) -> FloatArray:
        if self._range_table is None:  # T[lo, hi] = Σ_{lo<=j<hi}: one gather per evaluation
            self._range_table = self._prefix[None, :] - self._prefix[:, None]
        raw = self.batch_sizes[:, None] * joined[None, :]  # (B, ranges): expected batch seen by each range
        b = np.maximum(raw, self._grid[0])
        seg = np.searchsorted(self._inner, b, side="right")
        offset = b - self._grid[seg]
        parts = self._range_table[lo, hi, seg]  # (B, ranges, 2 · shares)
        n_shares = len(self.shares)
        parts[..., n_shares:] *= offset[..., None]
        parts *= below_one(raw)[..., None]  # ranges that run in only some batches
        out: FloatArray = parts.sum(axis=1).reshape(len(b), 2, n_shares).sum(axis=1)
        return out

    # ----------------------------------------------------------------------------------- allocation

    def cost(self, cut_rates: Mapping[int, float], budget_ms: float) -> float:
        """Cost n·g of the cheapest feasible allocation (inf when none), without the tie-breaks."""
        lat = self.latency_grid(cut_rates)
        per_request = lat * self.per_batch
        per_request[2.0 * lat > budget_ms] = np.inf
        best = per_request.min(axis=0)  # fewest replicas at each share come from the best L/B
        feasible = np.isfinite(best)
        if not feasible.any():
            return math.inf
        replicas = np.ceil(best[feasible] * (sum(cut_rates.values()) / self.rho / 1000.0) - CEIL_SLACK)
        np.maximum(replicas, 1.0, out=replicas)
        return float((replicas * self._share_f[feasible]).min())

    def allocate(self, cut_rates: Mapping[int, float], budget_ms: float) -> Allocation | None:
        """Cheapest feasible ``(B, g, n)`` for a group, or None when no grid point meets the budget."""
        key = (tuple(sorted(cut_rates.items())), budget_ms)
        if key in self._cache:
            return self._cache[key]
        result = self._search(self.latency_grid(cut_rates), sum(cut_rates.values()), budget_ms)
        self._cache[key] = result
        return result

    def _search(self, lat: FloatArray, total_rate: float, budget_ms: float) -> Allocation | None:
        feasible = 2.0 * lat <= budget_ms
        if not feasible.any():
            return None
        replicas = np.maximum(1.0, np.ceil(lat * self.per_batch * (total_rate / self.rho / 1000.0) - CEIL_SLACK))
        cost = np.where(feasible, replicas * self._share_f, np.inf)
        # lexicographic on cost, replicas, then the *largest* batch: at equal cost a larger max batch is
        # pure headroom (replicas batch eagerly, so it only grows when a queue builds, and still finishes
        # within 2·L(B) <= T); then the lower latency (a smaller share at equal cost is not possible)
        batch = np.broadcast_to(self.batch_sizes[:, None], lat.shape)
        order = np.lexsort((lat.ravel(), -batch.ravel(), replicas.ravel(), cost.ravel()))
        i, k = divmod(int(order[0]), lat.shape[1])
        return Allocation(batch=i + 1, share=int(self.shares[k]), replicas=int(replicas[i, k]),
                          latency_ms=float(lat[i, k]))

    def latency_table(self, cut_rates: Mapping[int, float], share: int, batch: int) -> tuple[float, ...]:
        """``L(b)`` in ms for b = 1..batch at share ``share`` and the expected composition of ``cut_rates``."""
        k = int(np.searchsorted(self.shares, share))
        if k >= len(self.shares) or self.shares[k] != share:
            raise ValueError(f"share {share} is not on the grid {self.shares.tolist()}")
        column = self.latency_grid(cut_rates)[:batch, k]
        return tuple(float(x) for x in column)

    def alone_latency(self, cut: int) -> tuple[float, int]:
        """Fastest batch-1 latency of ``cut`` alone over the grid shares, and the share that gives it."""
        row = self.suffix_grid(cut)[0]
        k = int(np.argmin(row))
        return float(row[k]), int(self.shares[k])

"""How long a replica expects a batch to take, corrected online by what it measures.

The batching policy needs ``L(batch)`` for the composition it is about to launch (``{cut: count}``).
The first guess is the profile's re-aligned latency at the group's share (design.md section 2); a
replica then corrects it with every measured batch, because the profile may come from another host,
another resolution, or a CPU whose timings wander with the other processes on it:

* the median of the last ``WINDOW`` ratios ``measured / predicted`` scales every prediction: a host
  that became slower moves it within half a window, while batches that stalled behind another
  process (a CPU shared with Redis, the ingress and the load generator spikes by 10× now and then)
  do not move it at all — an average would, and would then drop requests early that had time;
* a small memo per exact composition (the median of its last ``MEMO_RUNS`` runs) answers repeated
  compositions directly.

Without a usable profile entry (model missing, share off the grid) the base prediction is a work model
``k · Σ_c n_c·(N − c) + k · (N − c_min)`` — block-requests plus one launch per block — whose ``k``
starts from the plan's promised latency and is learnt the same way. Nothing here touches Redis or
torch, so it is unit-tested alone.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from collections.abc import Mapping
from pathlib import Path

import structlog

from common.profiles import ModelProfile, Profile, ProfileError, shipped
from common.settings import Settings

log = structlog.get_logger("worker.latency")

Counts = Mapping[int, int]

DEFAULT_S_PER_UNIT = 0.5e-3  # a block-request on a small model on one CPU core, before any measurement
MEMO_SIZE = 256
WINDOW = 32
MEMO_RUNS = 5


def composition(counts: Counts) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((int(c), int(n)) for c, n in counts.items() if n > 0))


def work_units(counts: Counts, n_blocks: int) -> float:
    """Block-requests of a re-aligned batch plus one unit per block launched."""
    present = [c for c, n in counts.items() if n > 0]
    if not present:
        return 0.0
    return float(sum(n * (n_blocks - c) for c, n in counts.items() if n > 0) + n_blocks - min(present))


class LatencyModel:
    """Predicted batch time in seconds; ``observe`` feeds back each measured batch."""

    def __init__(self, n_blocks: int, *, profile: ModelProfile | None = None, share: int | None = None,
                 prior_ms: float = 0.0, prior_batch: int = 1, prior_cut: int = 0, alpha: float = 0.2) -> None:
        self.n_blocks = n_blocks
        self.alpha = alpha
        self.source = "online"
        self.fallback_reason = "" if profile is not None else "no profile"
        self._profile: ModelProfile | None = None
        self._share = 0
        if profile is not None and share is not None:
            try:
                profile.share_index(share)
                if profile.n_blocks != n_blocks:
                    raise ProfileError(f"profile has {profile.n_blocks} blocks, the model {n_blocks}")
                self._profile, self._share, self.source = profile, int(share), "profile"
            except ProfileError as exc:
                self.fallback_reason = str(exc)
        units = work_units({prior_cut: max(1, prior_batch)}, n_blocks)
        self._s_per_unit = prior_ms / 1000.0 / units if prior_ms > 0 and units > 0 else DEFAULT_S_PER_UNIT
        self._log_ratio = 0.0
        self._ratios: deque[float] = deque(maxlen=WINDOW)  # recent log ratios
        self._memo: OrderedDict[tuple[tuple[int, int], ...], deque[float]] = OrderedDict()
        self.samples = 0

    @property
    def ratio(self) -> float:
        """Current correction factor measured / base prediction."""
        return math.exp(self._log_ratio)

    def base_s(self, counts: Counts) -> float:
        """Uncorrected prediction: the profile's L(batch, g), else the work model."""
        if self._profile is not None:
            return self._profile.realigned_latency({c: float(n) for c, n in counts.items()}, self._share) / 1000.0
        return self._s_per_unit * work_units(counts, self.n_blocks)

    def predict_s(self, counts: Counts) -> float:
        key = composition(counts)
        if not key:
            return 0.0
        runs = self._memo.get(key)
        if runs:
            return float(statistics.median(runs))
        return self.base_s(counts) * self.ratio

    __call__ = predict_s  # the batching policy's LatencyModel protocol: counts -> seconds

    def predict_ms(self, counts: Counts) -> float:
        return 1000.0 * self.predict_s(counts)

    def observe(self, counts: Counts, measured_s: float) -> None:
        key = composition(counts)
        if not key or not math.isfinite(measured_s) or measured_s <= 0:
            return
        base = self.base_s(counts)
        if base > 0:
            self._ratios.append(max(-5.0, min(5.0, math.log(measured_s / base))))
            self._log_ratio = float(statistics.median(self._ratios))
        runs = self._memo.pop(key, None) or deque(maxlen=MEMO_RUNS)
        runs.append(measured_s)
        self._memo[key] = runs
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        self.samples += 1


    def carry_from(self, other: LatencyModel) -> None:
        """Keep what ``other`` learnt of this host's speed (same model, same share, same process)."""
        self._log_ratio, self.samples = other._log_ratio, other.samples
        self._ratios = deque(other._ratios, maxlen=WINDOW)


def load_profile_model(settings: Settings, model: str, plan_profile: str | None = None) -> ModelProfile | None:
    """The profile of ``model`` a replica predicts latencies from (``GRAFT_PROFILE``, else the plan's)."""
    name = settings.profile or plan_profile
    if not name:
        log.info("latency_model_online", model=model, reason="no profile configured")
        return None
    path = Path(name) if Path(name).exists() else shipped(name)
    try:
        return Profile.load(path).model(model)
    except ProfileError as exc:
        log.warning("latency_model_online", model=model, reason=str(exc))
        return None


def latency_model(profile: ModelProfile | None, n_blocks: int, share: int, *, prior_ms: float = 0.0,
                  prior_batch: int = 1, prior_cut: int = 0) -> LatencyModel:
    """Profile latency at ``share`` when the profile knows it, else the online work model."""
    model = LatencyModel(n_blocks, profile=profile, share=share, prior_ms=prior_ms, prior_batch=prior_batch,
                         prior_cut=prior_cut)
    if model.source != "profile" and profile is not None:
        log.warning("latency_model_online", share=share, reason=model.fallback_reason)
    return model

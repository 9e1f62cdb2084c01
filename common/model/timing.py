"""What "latency" means in Graft: one definition for the profiler and for every replica.

The planner plans from profiled block latencies ``l_j(b, g)`` (design.md section 3) and corrects them
with what replicas measure (their ``measured / profile`` ratio drives calibration and the ingress's
admission), so both sides must time the same span with the same clock:

* **A block's latency** is wall-clock time (``clock``, i.e. ``time.perf_counter``) of the block's work on
  its device, the device synchronised before the first launch and after the last kernel ends
  (``torch.cuda.synchronize``; a no-op on the CPU, whose work is synchronous). On CUDA the profiler
  runs a short block back to back a few times between the two synchronisations (``burst_for``: until
  the burst lasts about ``AMORTISE_MS``) and keeps the mean per run, because a replica pays a
  synchronisation and the first launch after it once per batch, not once per block; each extra run
  is launched while the previous one executes, as block ``j+1`` is while block ``j`` runs in a batch.
* **A replica's batch time** (``FragmentRunner.last_compute_s``) is the same clock over the same kind of
  span: synchronise, from the first block's launch to the last block's end (the ``torch.cat`` that
  joins later cuts included: it is device work of the re-aligned batch), synchronise. Staging the
  inputs on the device (stacking, host→device copy) and bringing the output back (device→host) are
  timed apart (``last_copy_s``); they are not in the profile, and replies report them as ``copy_ms``.
* **cuDNN autotuning** (``torch.backends.cudnn.benchmark``) is on for CUDA in the profiler and in every
  replica (``prepare_device``): it picks each convolution's fastest algorithm per input shape, so a
  profile measured with it and a replica running without it disagree by whatever the default
  algorithm loses. Autotuning runs on the first call of each new shape; warm-up absorbs it (the
  profiler's warm-up runs per block and batch, a replica's runs every batch size it may be assigned).

On the CPU none of this changes anything: no synchronisation, no autotuning, copies are a memcpy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

AMORTISE_MS = 1.0  # a CUDA burst lasts about this long, so a synchronisation (~10 µs) costs ≤ ~1%
MAX_BURST = 16
TIMER = "wall clock between device synchronisations"  # recorded in measured profiles

clock: Callable[[], float] = time.perf_counter  # the one clock of profiles and replicas (tests swap it)


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Where one batch's time went, in seconds (see the module docstring for the spans)."""

    compute_s: float  # first block's launch to last block's end, synchronised: the profile's quantity
    upload_s: float  # stacking the request tensors and copying them to the device
    download_s: float = 0.0  # the batch output back to the host (run_numpy only)

    @property
    def copy_s(self) -> float:
        return self.upload_s + self.download_s


def prepare_device(device: str | torch.device) -> None:
    """Turn on what profiler and replicas must share before a model runs on ``device``."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished all queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device, runs: int = 1) -> float:
    """Mean wall-clock ms per run of ``runs`` back-to-back calls of ``fn``, synchronised around them."""
    synchronize(device)
    t0 = clock()
    for _ in range(max(1, runs)):
        fn()
    synchronize(device)
    return (clock() - t0) * 1e3 / max(1, runs)


def burst_for(single_ms: float, device: torch.device) -> int:
    """How many back-to-back runs one timed sample of a block takes: 1 on the CPU, on CUDA enough to
    last about ``AMORTISE_MS`` (a block of a millisecond or more is timed alone)."""
    if device.type != "cuda" or not math.isfinite(single_ms):
        return 1
    return max(1, min(MAX_BURST, math.ceil(AMORTISE_MS / max(single_ms, 1e-3))))

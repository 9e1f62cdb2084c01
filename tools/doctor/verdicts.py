"""Pure verdicts: numbers in, a ``Check`` out. Every threshold of ``graft doctor`` lives here.

**A share limits throughput.** The same compute-bound workload (a large fp16 matmul loop, about a second)
runs in two processes, one with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100`` and one with ``=20``. Under
MPS a client with an active-thread percentage ``s`` gets about ``s`` percent of the SMs, and a matmul
that fills every SM slows down in proportion, so the expected ratio ``rate(20%) / rate(100%)`` is about
0.2 — up to about 0.3 where fewer active SMs boost higher and the last wave of tiles is ragged.
PASS at ≤ ``2.5 · s/100`` (0.5 for 20%), FAIL at ≥ ``SHARE_FAIL_RATIO`` (0.8: both ran at nearly full
speed — no MPS daemon, or the share never reached it), WARN between (limited, but far less than the
share says: a busy GPU, or a cap on the 100% client).

**Profile vs runtime.** The profiler's per-block latencies summed the way the planner sums them
(design.md section 2) against a ``FragmentRunner`` batch timed as a replica times it
(``common.model.timing``): ``runtime / profile`` must lie within ±``AGREEMENT_TOLERANCE`` (15%) for
every composition tried. Above: replicas are slower than plans assume (SLO misses); below: plans
over-provision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tools.doctor.report import Check, failed, passed, warned

SHARE_LIMITED_PCT = 20
SHARE_PASS_FACTOR = 2.5  # PASS while rate(s)/rate(100) <= factor * s/100
SHARE_FAIL_RATIO = 0.8
AGREEMENT_TOLERANCE = 0.15
MEMORY_FAIL_GIB = 2.0
MEMORY_WARN_FRACTION = 0.25
MIN_PYTHON = (3, 11)
GIB = 2**30

MPS_FIX = ("start the MPS control daemon as the user the workers run as: `nvidia-cuda-mps-control -d` "
           "(with the same CUDA_MPS_PIPE_DIRECTORY as the workers, if set)")


def share_limit(full_tflops: float, limited_tflops: float, *, mps_running: bool,
                limited_share: int = SHARE_LIMITED_PCT) -> Check:
    """Did the ``limited_share`` process run clearly slower than the 100% one?"""
    name = "share limits throughput"
    data = {"full_tflops": full_tflops, "limited_tflops": limited_tflops, "limited_share": limited_share,
            "mps_running": mps_running}
    if not (full_tflops > 0 and limited_tflops > 0):
        return failed(name, f"100%: {full_tflops:.1f} TFLOP/s, {limited_share}%: {limited_tflops:.1f} TFLOP/s",
                      "the workload did not run in one of the two processes", "see the probe's error above", data=data)
    ratio = limited_tflops / full_tflops
    expected = limited_share / 100.0
    pass_max = SHARE_PASS_FACTOR * expected
    figure = (f"{limited_share}%/100% = {ratio:.2f} ({limited_tflops:.1f} vs {full_tflops:.1f} TFLOP/s; "
              f"expect ≈{expected:.1f}–{min(1.0, expected + 0.1):.1f}, PASS ≤ {pass_max:.2f})")
    data["ratio"] = ratio
    if ratio <= pass_max:
        return passed(name, figure, f"the {limited_share}% share ran at {ratio:.0%} of the full GPU: MPS enforces "
                                    "shares", data=data)
    if ratio >= SHARE_FAIL_RATIO:
        if not mps_running:
            return failed(name, figure, "both processes ran at full speed: without an MPS control daemon "
                                        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE does nothing, so every replica gets the "
                                        "whole GPU and a plan's shares are fiction", MPS_FIX, data=data)
        return failed(name, figure, "an MPS daemon is reachable, but the share did not bind",
                      "check that the daemon and the workers use the same CUDA_MPS_PIPE_DIRECTORY and user, "
                      "that the GPU is Volta or newer (per-client thread limits), and that no other MPS "
                      "server with another default holds the GPU (`echo get_server_list | nvidia-cuda-mps-control`)",
                      data=data)
    return warned(name, figure, f"the {limited_share}% share is limited, but much less than it should be",
                  "run again on an idle GPU (nvidia-smi); check the daemon's default: "
                  "`echo get_default_active_thread_percentage | nvidia-cuda-mps-control` should print 100",
                  data=data)


@dataclass(frozen=True, slots=True)
class Agreement:
    """One composition: the profile's prediction and the runner's measured compute span, in ms."""

    label: str
    profile_ms: float
    runtime_ms: float
    copy_ms: float = 0.0

    @property
    def ratio(self) -> float:
        return self.runtime_ms / self.profile_ms if self.profile_ms > 0 else float("inf")


def agreement(cases: Sequence[Agreement], *, tolerance: float = AGREEMENT_TOLERANCE) -> Check:
    """Does a replica's batch time match the profile's sum within ±``tolerance`` for every case?"""
    name = "profile vs runtime"
    data = {"tolerance": tolerance, "cases": [{"label": c.label, "profile_ms": c.profile_ms,
                                               "runtime_ms": c.runtime_ms, "copy_ms": c.copy_ms,
                                               "ratio": c.ratio} for c in cases]}
    if not cases:
        return failed(name, "no measurement", "the agreement probe measured nothing", "see the probe's error",
                      data=data)
    figure = "; ".join(f"{c.label}: {c.runtime_ms:.2f} vs {c.profile_ms:.2f} ms = {c.ratio:.2f}" for c in cases)
    figure += f" (runtime/profile, PASS within 1±{tolerance:.2f})"
    worst = max(cases, key=lambda c: abs(c.ratio - 1.0))
    if abs(worst.ratio - 1.0) <= tolerance:
        copies = max(c.copy_ms for c in cases)
        return passed(name, figure, f"a replica's batch time is the profile's sum; host↔device copies "
                                    f"(up to {copies:.2f} ms, reported apart as copy_ms) are not in either", data=data)
    if worst.ratio > 1.0:
        why = (f"{worst.label}: replicas run {worst.ratio - 1.0:.0%} slower than the profile says: plans made "
               "from it are optimistic and will miss SLOs")
    else:
        why = (f"{worst.label}: replicas run {1.0 - worst.ratio:.0%} faster than the profile says: plans made "
               "from it over-provision GPU shares")
    return failed(name, figure, why, "make sure nothing else runs on the GPU (nvidia-smi) and run again; if it "
                                     "persists, profiler and replica no longer time the same span "
                                     "(common/model/timing.py)", data=data)


def free_memory(free_bytes: int, total_bytes: int) -> Check:
    name = "free GPU memory"
    free_gib, total_gib = free_bytes / GIB, total_bytes / GIB
    figure = f"{free_gib:.1f} of {total_gib:.1f} GiB free"
    data = {"free_bytes": free_bytes, "total_bytes": total_bytes}
    if free_gib < MEMORY_FAIL_GIB:
        return failed(name, figure, f"under {MEMORY_FAIL_GIB:g} GiB free: replicas will not load a model",
                      "stop what holds the memory (nvidia-smi shows the processes)", data=data)
    if total_bytes > 0 and free_bytes < MEMORY_WARN_FRACTION * total_bytes:
        return warned(name, figure, f"other processes hold over {1 - MEMORY_WARN_FRACTION:.0%} of the GPU's memory",
                      "check nvidia-smi: leftover replicas or another tenant", data=data)
    return passed(name, figure, data=data)


def cudnn(available: bool, version: int | None, benchmark: bool) -> Check:
    name = "cuDNN autotuning"
    data = {"available": available, "version": version, "benchmark": benchmark}
    if not available:
        return warned(name, "cuDNN not available", "convolutions run on slower kernels; profile and replicas still "
                                                   "time the same thing", "install a torch build with cuDNN", data=data)
    figure = f"cuDNN {version}, torch.backends.cudnn.benchmark={benchmark}"
    if not benchmark:
        return failed(name, figure, "autotuning is off after graft's device preparation: profiles (measured with "
                                    "it) would not match replicas", "see common/model/timing.py prepare_device", data=data)
    return passed(name, figure, "on in the profiler and in every replica; warm-up absorbs the tuning", data=data)


def mps_daemon(pipe_found: bool, process_found: bool, pipe_dir: str) -> Check:
    name = "MPS control daemon"
    data = {"pipe_found": pipe_found, "process_found": process_found, "pipe_dir": pipe_dir}
    if pipe_found:
        return passed(name, f"control pipe at {pipe_dir}/control", "worker agents will report MPS shares as enforced",
                      data=data)
    if process_found:
        return warned(name, f"nvidia-cuda-mps-control runs, no pipe at {pipe_dir}",
                      "agents look for the control pipe and will warn that shares are not enforced",
                      "set CUDA_MPS_PIPE_DIRECTORY to the daemon's pipe directory for graft's services", data=data)
    return failed(name, f"no daemon (no pipe at {pipe_dir}, no nvidia-cuda-mps-control process)",
                  "without it CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is ignored: every replica runs on the whole GPU",
                  MPS_FIX, data=data)


def cpu_threads(usable_cores: int, torch_threads: int, cpu_count: int) -> Check:
    name = "CPU threads"
    figure = f"{usable_cores} usable cores (of {cpu_count}), torch uses {torch_threads} threads"
    data = {"usable_cores": usable_cores, "torch_threads": torch_threads, "cpu_count": cpu_count}
    if torch_threads > usable_cores:
        return warned(name, figure, "torch runs more threads than this process may use: CPU timings wander",
                      f"set OMP_NUM_THREADS={usable_cores} (graft sets each CPU replica's threads itself)", data=data)
    return passed(name, figure, "CPU shares are thread counts; a plan's CPU shares should sum to at most the "
                                "usable cores", data=data)


def python_version(version: tuple[int, int, int], executable: str) -> Check:
    name = "python"
    figure = f"{'.'.join(map(str, version))} ({executable})"
    if tuple(version[:2]) < MIN_PYTHON:
        return failed(name, figure, f"graft needs Python {'.'.join(map(str, MIN_PYTHON))} or newer",
                      "make venv with python3.11 (`make venv`)", data={"version": list(version)})
    return passed(name, figure, data={"version": list(version)})

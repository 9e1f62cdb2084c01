"""The checks of ``graft doctor``: each a small function returning ``Check`` rows; ``run_doctor`` runs them.

Without ``--gpu``: the general environment (Python, torch, CPU threads, a redis-server binary, the
Redis at ``REDIS_URL`` when one is set) and whether a GPU exists (none: WARN, exit 0).

With ``--gpu``: first, whether any GPU check can run at all — without CUDA the doctor stops with
one line and exit code 2 (``cuda_unavailable``), never falling back to the CPU. Then the general rows
and: CUDA (build, visible GPUs, device name), the driver through NVML (worker agents discover GPUs
with it), the MPS control daemon, then two probe processes (``probes.py``) started with a replica's
environment at 100% and 20% share: cuDNN autotuning, free memory, a share limiting throughput,
profile vs runtime agreement. The parent never creates a CUDA context itself, so an exclusive-process
GPU or the MPS server sees only the probes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tools.doctor import verdicts
from tools.doctor.report import Check, Report, Status, failed, passed, warned

Step = Callable[[str], None]


# ------------------------------------------------------------------------------------ general


def check_python() -> Check:
    v = sys.version_info
    return verdicts.python_version((v.major, v.minor, v.micro), sys.executable)


def check_torch() -> Check:
    try:
        import torch
        import torchvision
    except ImportError as exc:
        return failed("torch", "not importable", str(exc), "install graft with its dependencies: `make venv` "
                                                          "(or pip install -e .)")
    build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return passed("torch", f"torch {torch.__version__} ({build}), torchvision {torchvision.__version__}",
                  data={"torch": torch.__version__, "cuda_build": torch.version.cuda})


def check_cpu_threads() -> Check:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return verdicts.cpu_threads(usable, torch.get_num_threads(), os.cpu_count() or usable)


def check_redis_server(redis_url: str | None) -> Check:
    from tools.redis_server import RedisServerError, find_redis_server

    name = "redis-server"
    try:
        binary = find_redis_server()
    except RedisServerError as exc:
        if redis_url:
            return warned(name, "not found", "not needed while REDIS_URL names a Redis; graft up without it and "
                                             "the tests need one", str(exc).split(": ", 1)[-1])
        return failed(name, "not found", "graft up embeds a redis-server when REDIS_URL is unset, and there is none",
                      "apt-get install redis-server, or set REDIS_URL to a running Redis")
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return failed(name, binary, f"found but does not run: {exc}", "reinstall it, or set GRAFT_REDIS_SERVER")
    return passed(name, f"{binary} ({version.split(' sha=')[0] or 'version unknown'})", data={"path": binary})


async def _ping(url: str, timeout_s: float) -> float:
    from common.settings import Settings
    from common.store.connection import connect

    r = connect(url, settings=Settings.from_env(), client_name="graft-doctor")
    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(r.ping(), timeout_s)
        return (time.perf_counter() - t0) * 1e3
    finally:
        await r.aclose()


def check_redis_url(redis_url: str | None, timeout_s: float = 3.0) -> Check:
    name = "REDIS_URL"
    if not redis_url:
        return passed(name, "not set", "graft up starts an embedded Redis (redis-server below)")
    shown = redis_url.split("@")[-1]  # never print a password
    try:
        ms = asyncio.run(_ping(redis_url, timeout_s))
    except Exception as exc:  # any failure to reach it is the finding
        return failed(name, f"{shown}: unreachable", f"{type(exc).__name__}: {exc}",
                      "start Redis there, or fix REDIS_URL (and GRAFT_REDIS_MODE for a cluster)")
    return passed(name, f"{shown}: PING {ms:.1f} ms", data={"ping_ms": ms})


def check_profile(name: str) -> Check:
    """``GRAFT_PROFILE``: a measured GPU profile must be timed as replicas time batches (common.model.timing)."""
    from common.model.timing import TIMER
    from common.profiles import Profile, ProfileError, shipped

    row = "GRAFT_PROFILE"
    try:
        prof = Profile.load(name if os.path.exists(name) else shipped(name))
    except (ProfileError, OSError, ValueError) as exc:
        return failed(row, name, f"cannot load it: {exc}", "point GRAFT_PROFILE at a profile file (graft profile)")
    figure = f"{name}: {prof.source}, {prof.device}"
    timing = prof.meta.get("timing") or {}
    if prof.source == "measured" and prof.unit == "gpu_share_pct":
        if timing.get("timer") != TIMER:
            return warned(row, figure, f"measured with another timer ({timing.get('timer')!r}) than replicas time "
                                       "their batches by: plans from it will not match the runtime",
                          "measure it again: graft profile --device cuda")
        if prof.meta.get("shares_isolated") is False:
            return warned(row, figure, "measured without an MPS daemon: every share ran on the whole GPU",
                          "start nvidia-cuda-mps-control -d and measure it again")
    if prof.source == "estimated":
        return passed(row, figure, "an analytic estimate: plans are only as good as it; `graft doctor --gpu` and "
                                   "`graft profile --device cuda` measure this host")
    return passed(row, figure)


def check_gpu_presence() -> Check:
    """Without ``--gpu``: is there a GPU at all? None is a WARN (graft serves on the CPU)."""
    from services.worker.device import nvml_gpu_count

    reason = cuda_unavailable()
    count, note = nvml_gpu_count()
    if reason is None:
        return passed("GPU", f"{count or 'some'} GPU(s) usable", "run `graft doctor --gpu` for the GPU checks",
                      data={"nvml_count": count})
    return warned("GPU", "none usable", f"{reason}; graft serves on the CPU (shares are thread counts)",
                  "on a GPU host run `graft doctor --gpu`", data={"nvml_count": count, "nvml": note})


def general_checks() -> list[Check]:
    redis_url = os.environ.get("REDIS_URL") or None
    rows = [check_python(), check_torch()]
    if rows[-1].status is not Status.FAIL:
        rows.append(check_cpu_threads())
    rows += [check_redis_server(redis_url), check_redis_url(redis_url)]
    profile = os.environ.get("GRAFT_PROFILE")
    return [*rows, check_profile(profile)] if profile else rows


# ------------------------------------------------------------------------------------ GPU


def cuda_unavailable(device_index: int = 0) -> str | None:
    """Why no GPU check can run on GPU ``device_index`` of this host, or None when CUDA is usable."""
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported ({exc})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    if not torch.cuda.is_available():
        from services.worker.device import nvml_gpu_count

        count, note = nvml_gpu_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"NVML sees {count} GPU(s)" if count else f"no GPU driver ({note})"
        return (f"CUDA is not available (torch.cuda.is_available() is False; {seen}; "
                f"CUDA_VISIBLE_DEVICES={visible!r})")
    from services.worker.device import nvml_gpu_count

    count, _ = nvml_gpu_count()
    total = count or torch.cuda.device_count()
    if device_index >= total:
        return f"GPU {device_index} is not on this host ({total} GPU(s))"
    return None


def check_cuda(info: dict[str, Any] | None, error: str) -> Check:
    import torch

    base = f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible"
    if info is None:
        return failed("CUDA", base, f"the probe could not use the GPU: {error}", "run nvidia-smi; check the driver "
                                                                                "supports this CUDA version")
    return passed("CUDA", f"{base}; {info['name']} (sm_{info['capability'].replace('.', '')}, "
                          f"{info['sm_count']} SMs)", data=info)


def check_driver(device_index: int) -> Check:
    from common.profiling.measure import gpu_telemetry
    from services.worker.device import nvml_gpu_count

    tel = gpu_telemetry(device_index)
    count, note = nvml_gpu_count()
    if not tel.get("available"):
        return failed("driver (NVML)", "unavailable", f"{tel.get('reason')}: worker agents discover GPUs through NVML "
                                                      "and would serve on the CPU (--devices auto)",
                      "install nvidia-ml-py in graft's environment and check the driver (nvidia-smi)")
    return passed("driver (NVML)", f"driver {tel['driver']}, NVML sees {count} GPU(s); gpu{device_index}: "
                                   f"{tel['name']}, {tel['utilization_gpu_pct']}% busy", data={"nvml": note, **tel})


def _mps_process() -> bool:
    if shutil.which("pgrep") is None:
        return False
    try:
        return subprocess.run(["pgrep", "-x", "nvidia-cuda-mps-control"], capture_output=True, timeout=5,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def check_mps() -> Check:
    """The agents' test (``device.mps_running``: the control pipe), and the daemon's process beside it."""
    from services.worker.device import MPS_PIPE_DEFAULT, mps_running

    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DEFAULT
    return verdicts.mps_daemon(mps_running(), _mps_process(), pipe_dir)


def gpu_checks(device_index: int = 0, *, step: Step | None = None) -> list[Check]:
    """The GPU rows (CUDA must be usable: see ``cuda_unavailable``)."""
    from tools.doctor import probes

    say = step or (lambda _msg: None)
    rows = [check_driver(device_index), check_mps()]
    mps_ok = rows[-1].status is not Status.FAIL
    matmul = {"seconds": probes.MATMUL_SECONDS, "size": probes.MATMUL_SIZE}
    say("probe at 100% share: device info, matmul, profile vs runtime")
    full = probes.run_probe({"info": True, "matmul": matmul, "agreement": {"model": probes.AGREEMENT_MODEL,
                                                                          "batch": probes.AGREEMENT_BATCH}},
                            100, device_index=device_index)
    say(f"probe at {verdicts.SHARE_LIMITED_PCT}% share: matmul")
    limited = probes.run_probe({"matmul": matmul}, verdicts.SHARE_LIMITED_PCT, device_index=device_index)
    info = full.parts.get("info")
    rows.insert(0, check_cuda(info, full.error_of("info")))
    if info is not None:
        rows.append(verdicts.cudnn(info["cudnn_available"], info["cudnn_version"], info["cudnn_benchmark"]))
        rows.append(verdicts.free_memory(info["free_bytes"], info["total_bytes"]))
    if "matmul" in full.parts and "matmul" in limited.parts:
        rows.append(verdicts.share_limit(float(full.parts["matmul"]), float(limited.parts["matmul"]),
                                         mps_running=mps_ok))
    else:
        why = full.error_of("matmul") if "matmul" not in full.parts else limited.error_of("matmul")
        rows.append(failed("share limits throughput", "not measured", why, "see the error"))
    if "agreement" in full.parts:
        cases = [verdicts.Agreement(**c) for c in full.parts["agreement"]]
        rows.append(verdicts.agreement(cases))
    else:
        rows.append(failed("profile vs runtime", "not measured", full.error_of("agreement"), "see the error"))
    return rows


def run_doctor(*, gpu: bool, device_index: int = 0, step: Step | None = None) -> Report:
    """Every check ``graft doctor [--gpu]`` runs, as one report (see the module docstring)."""
    report = Report(gpu=gpu)
    if gpu:
        reason = cuda_unavailable(device_index)
        if reason is not None:
            report.error = f"graft doctor --gpu: no GPU check can run: {reason}"
            report.checks.append(failed("CUDA", "unavailable", reason, "run on a host with an NVIDIA GPU, its driver "
                                                                       "and a CUDA build of torch"))
            return report
    report.extend(general_checks())
    report.extend(gpu_checks(device_index, step=step) if gpu else [check_gpu_presence()])
    return report

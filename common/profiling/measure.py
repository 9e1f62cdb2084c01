"""Measured profiles: per-block latency on this host, on the CPU (threads) or CUDA (MPS shares).

Each block is timed on its real input at every grid batch size (the previous block's output), after
warm-up, and the median of the repeats is kept. A sample is the wall-clock time of the block with the
device synchronised before and after (``common.model.timing``, the definition replicas time their
batches by); on CUDA a block shorter than about a millisecond runs a few times back to back within one
sample (mean per run kept), since a replica synchronises once per batch, not per block, and cuDNN
autotuning is on (as in every replica; the warm-up runs absorb it). On the CPU a "share" is a thread count
(``torch.set_num_threads``). On CUDA every share runs in its own child process
(``python -m common.profiling.measure --worker``) whose environment carries ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
before CUDA initialises — the share only binds when an MPS control daemon is running, and the file
says whether one was. Children report JSON lines on stdout (never pickle).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.model.optimize import inference_blocks
from common.model.timing import TIMER, burst_for, prepare_device, wall_ms
from common.model.zoo import build_blocks, describe
from common.profiles import Profile, make_profile

LINE_TAG = "GRAFT-PROFILER "
DEFAULT_BATCHES: tuple[int, ...] = (1, 2, 4, 8)
GPU_SHARES: tuple[int, ...] = tuple(range(10, 101, 10))
Step = Callable[[str], None]  # called once per (model, share, batch) measured


class ProfilerError(RuntimeError):
    """Profiling cannot run as asked (no CUDA, a child failed); the message says what to do."""


@dataclass(frozen=True)
class MpsStatus:
    running: bool
    detail: str


def mps_status() -> MpsStatus:
    """Is an MPS control daemon reachable? Without one, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE does nothing."""
    pipe_dir = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if (pipe_dir / "control").exists():
        return MpsStatus(True, f"MPS control pipe found at {pipe_dir / 'control'}")
    try:
        found = subprocess.run(["pgrep", "-x", "nvidia-cuda-mps-control"], capture_output=True,
                               timeout=5, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if found:
        return MpsStatus(True, "nvidia-cuda-mps-control is running (pipe directory not found at "
                               f"{pipe_dir}; set CUDA_MPS_PIPE_DIRECTORY if it is elsewhere)")
    return MpsStatus(False, f"no MPS control daemon (no pipe at {pipe_dir}, no nvidia-cuda-mps-control "
                            "process): shares are NOT isolated, every share ran on the whole GPU")


def gpu_telemetry(index: int = 0) -> dict[str, Any]:
    """Name, memory and utilisation of GPU ``index`` via NVML, or why there is none."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "pynvml (nvidia-ml-py) is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML cannot initialise: {exc}"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        name = pynvml.nvmlDeviceGetName(h)
        return {"available": True, "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_total_mib": int(mem.total) // 2**20, "memory_used_mib": int(mem.used) // 2**20,
                "utilization_gpu_pct": int(util.gpu), "utilization_memory_pct": int(util.memory),
                "driver": str(pynvml.nvmlSystemGetDriverVersion())}
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML query failed: {exc}"}
    finally:
        pynvml.nvmlShutdown()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}


# ------------------------------------------------------------------------------------ timing


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_model(name: str, *, device: str, batches: Sequence[int], resolution: int | None,
                  warmup: int, repeats: int, seed: int = 0, step: Step | None = None) -> list[list[float]]:
    """Median latency (ms) ``[batch index][block]`` of every block on its real input (see the module doc)."""
    dev = torch.device(device)
    prepare_device(dev)
    info = describe(name, resolution)
    # The modules a replica runs (common.model.optimize: TorchScript-optimised on the CPU).
    blocks = inference_blocks(build_blocks(name, resolution=info.resolution, seed=seed), info, dev)
    gen = torch.Generator().manual_seed(seed)
    rows: list[list[float]] = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn((b, *info.input_shape), generator=gen).to(dev)
            row = []
            for block in blocks:
                xin = x
                for _ in range(warmup):
                    block(xin)
                run = functools.partial(block, xin)
                runs = burst_for(wall_ms(run, dev), dev) if dev.type == "cuda" else 1
                row.append(statistics.median(wall_ms(run, dev, runs) for _ in range(max(1, repeats))))
                x = block(xin)
            rows.append(row)
            if step is not None:
                step(f"{name} b={b}")
    return rows


# ------------------------------------------------------------------------------------ assembly


def _assemble(models: Sequence[str], resolution: int | None, batches: Sequence[int], shares: Sequence[int],
              tables: dict[str, dict[int, list[list[float]]]]) -> dict[str, Any]:
    """``tables[model][share][batch index][block]`` → the profile's ``models`` section."""
    out: dict[str, Any] = {}
    for name in models:
        info = describe(name, resolution)
        out[name] = {
            "input_shape": list(info.input_shape), "input_bytes": info.input_bytes,
            "blocks": [{"name": bi.name, "out_bytes": bi.out_bytes, "flops": bi.flops,
                        "latency_ms": [[round(tables[name][g][i][j], 5) for g in shares]
                                       for i in range(len(batches))]}
                       for j, bi in enumerate(info.blocks)],
        }
    return out


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Step]:
    if not enabled:
        yield lambda _msg: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda msg: bar.update(task, advance=1, description=f"{label}: {msg}")


def profile_models(models: Sequence[str], *, device: str = "cpu", batches: Sequence[int] = DEFAULT_BATCHES,
                   shares: Sequence[int] | None = None, threads: Sequence[int] | None = None,
                   resolution: int | None = None, warmup: int = 3, repeats: int = 10, seed: int = 0,
                   progress: bool = False) -> Profile:
    """Measure a profile on this host. CPU: ``threads`` (or ``shares``) are thread counts; CUDA: MPS shares."""
    batches = sorted({int(b) for b in batches})
    if not models or not batches or batches[0] < 1:
        raise ProfilerError("give at least one model and positive batch sizes")
    for name in models:
        describe(name, resolution)  # unknown names and bad resolutions fail before any timing
    if device == "cpu":
        grid = sorted({int(t) for t in (threads or shares or [torch.get_num_threads()])})
        tables: dict[str, dict[int, list[list[float]]]] = {m: {} for m in models}
        with _progress(progress, len(models) * len(grid) * len(batches), "profiling (cpu)") as step:
            for t in grid:
                def threads_step(what: str, t: int = t) -> None:
                    step(f"{what} threads={t}")

                with _threads(t):
                    for name in models:
                        tables[name][t] = measure_model(name, device="cpu", batches=batches, resolution=resolution,
                                                        warmup=warmup, repeats=repeats, seed=seed, step=threads_step)
        host = {**host_info(), "telemetry": {"available": False, "reason": "CPU profile: no GPU telemetry"}}
        return make_profile("measured", f"cpu: {host['cpu']} ({host['cpu_count']} logical cores)", "cpu_threads",
                            batches, grid, _assemble(models, resolution, batches, grid, tables), host=host,
                            timing={"warmup": warmup, "repeats": repeats, "statistic": "median"},
                            resolutions={m: describe(m, resolution).resolution for m in models})
    if device == "cuda":
        return _profile_cuda(models, batches, sorted({int(g) for g in (shares or GPU_SHARES)}), resolution,
                             warmup, repeats, seed, progress)
    raise ProfilerError(f"unknown device {device!r} (cpu or cuda)")


# ------------------------------------------------------------------------------------ CUDA


def _profile_cuda(models: Sequence[str], batches: Sequence[int], shares: Sequence[int], resolution: int | None,
                  warmup: int, repeats: int, seed: int, progress: bool) -> Profile:
    if not torch.cuda.is_available():
        raise ProfilerError("CUDA is not available on this host (torch.cuda.is_available() is False); "
                            "profile with --device cpu, or use an estimated GPU profile (--estimate-gpu v100)")
    if shares[0] < 1 or shares[-1] > 100:
        raise ProfilerError("GPU shares are percentages between 1 and 100")
    mps = mps_status()
    tables: dict[str, dict[int, list[list[float]]]] = {m: {} for m in models}
    telemetry: dict[str, Any] = {}
    spec = {"models": list(models), "batches": list(batches), "resolution": resolution, "warmup": warmup,
            "repeats": repeats, "seed": seed}
    with _progress(progress, len(models) * len(shares) * len(batches), "profiling (cuda)") as step:
        for g in shares:
            result = _run_share_child(spec, g, step)
            for name in models:
                tables[name][g] = result["models"][name]
            telemetry[str(g)] = result["telemetry"]
    host = {**host_info(), "gpu": gpu_telemetry(), "telemetry_per_share": telemetry,
            "mps": {"running": mps.running, "detail": mps.detail}}
    gpu_name = host["gpu"].get("name") or torch.cuda.get_device_name(0)
    return make_profile("measured", f"cuda: {gpu_name}", "gpu_share_pct", batches, shares,
                        _assemble(models, resolution, batches, shares, tables), host=host,
                        timing={"warmup": warmup, "repeats": repeats, "statistic": "median", "timer": TIMER,
                                "cudnn_benchmark": True},
                        shares_isolated=mps.running,
                        resolutions={m: describe(m, resolution).resolution for m in models})


def _run_share_child(spec: dict[str, Any], share: int, step: Step) -> dict[str, Any]:
    env = {**os.environ, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(share)}
    cmd = [sys.executable, "-m", "common.profiling.measure", "--worker", json.dumps(spec)]
    result: dict[str, Any] | None = None
    error: str | None = None
    with tempfile.TemporaryFile(mode="w+") as err:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not line.startswith(LINE_TAG):
                    continue  # anything else a library prints on stdout
                msg = json.loads(line[len(LINE_TAG):])
                if msg["event"] == "step":
                    step(f"{msg['what']} share={share}%")
                elif msg["event"] == "result":
                    result = msg
                elif msg["event"] == "error":
                    error = str(msg["message"])
        err.seek(0)
        tail = err.read()[-2000:]
    if error is not None:
        raise ProfilerError(f"share {share}%: {error}")
    if proc.returncode != 0 or result is None:
        raise ProfilerError(f"profiling child for share {share}% failed (exit {proc.returncode}):\n{tail}")
    return result


def _emit(**msg: Any) -> None:
    sys.stdout.write(LINE_TAG + json.dumps(msg) + "\n")
    sys.stdout.flush()


def _worker(spec: dict[str, Any]) -> int:
    """Child process: the share is already in the environment; measure every model on cuda:0."""
    if not torch.cuda.is_available():
        share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "unset")
        _emit(event="error", message=f"CUDA is not available in the profiling child "
                                     f"(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={share})")
        return 3
    prepare_device("cuda")  # cuDNN autotuning, as every replica runs; warm-up runs absorb it
    models: dict[str, list[list[float]]] = {}
    for name in spec["models"]:
        models[name] = measure_model(name, device="cuda", batches=spec["batches"], resolution=spec["resolution"],
                                     warmup=spec["warmup"], repeats=spec["repeats"], seed=spec["seed"],
                                     step=lambda what: _emit(event="step", what=what))
    _emit(event="result", models=models, telemetry=gpu_telemetry(torch.cuda.current_device()),
          share=os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Graft profiler child (run by profile_models on CUDA)")
    parser.add_argument("--worker", required=True, help="JSON spec of what to measure")
    args = parser.parse_args(argv)
    return _worker(json.loads(args.worker))


if __name__ == "__main__":
    raise SystemExit(main())

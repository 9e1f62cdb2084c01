"""The workloads of ``graft doctor --gpu``, each run in a child process that gets its share as a replica does.

A child's environment comes from ``services.worker.device.share_env`` — the very function worker agents
start replicas with (``CUDA_VISIBLE_DEVICES``, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` set before CUDA
initialises) — and it reports tagged JSON lines on stdout, one per part of its spec:

* ``info``: device name, compute capability, free/total memory, cuDNN version and autotuning state
  after ``common.model.timing.prepare_device`` (what profiler and replicas run with);
* ``matmul``: TFLOP/s of a fp16 ``size``×``size`` matmul loop run for ``seconds`` (compute-bound: it
  fills every SM, so its rate follows the SMs an MPS share allows);
* ``agreement``: the profiler's per-block latencies of ``model`` (``measure_model``, the code
  ``graft profile`` runs) summed as the planner sums them, against ``FragmentRunner`` batches timed as
  a replica times them (``last_compute_s``), for a uniform and a re-aligned mixed-cut batch.

``python -m tools.doctor.probes SPEC`` is the child; ``run_probe`` starts it and collects its parts.
The parts also run in-process on any torch device (``"device": "cpu"`` in a spec; the tests do).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from common.model.executor import FragmentRunner, Item
from common.model.timing import prepare_device, synchronize
from common.profiling.measure import measure_model
from services.worker.device import Device, share_env
from tools.doctor.verdicts import Agreement

LINE_TAG = "GRAFT-DOCTOR "
MATMUL_SIZE = 4096
MATMUL_SECONDS = 1.0
MATMUL_CHUNK = 8  # matmuls queued between two synchronisations
AGREEMENT_MODEL = "resnet50"
AGREEMENT_BATCH = 32
PROBE_TIMEOUT_S = 300.0


@dataclass(slots=True)
class ProbeResult:
    """What one child reported: its parts by name, the errors by part, how it ended."""

    share: int
    parts: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    stderr_tail: str = ""

    def error_of(self, part: str) -> str:
        """Why ``part`` is missing: its own error, else the child's ending."""
        if part in self.errors:
            return self.errors[part]
        if "probe" in self.errors:
            return self.errors["probe"]
        tail = self.stderr_tail.strip().splitlines()[-1:] or [""]
        return f"the {self.share}% probe exited with {self.exit_code} before reporting {part} {tail[0]}".strip()


# ------------------------------------------------------------------------------------ workloads


def matmul_tflops(device: torch.device, *, seconds: float = MATMUL_SECONDS, size: int = MATMUL_SIZE) -> float:
    """Sustained TFLOP/s of ``size``² matmuls (fp16 on CUDA, fp32 elsewhere) over about ``seconds``."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    c = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=c)
    synchronize(device)
    runs = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(MATMUL_CHUNK):
            torch.mm(a, b, out=c)
        runs += MATMUL_CHUNK
        synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2.0 * size**3 * runs / elapsed / 1e12


def _median_run(runner: FragmentRunner, items: Sequence[Item], warmup: int, repeats: int) -> tuple[float, float]:
    """Median compute and copy ms of ``runner.run_numpy(items)``, timed as a replica times its batches."""
    for _ in range(warmup):
        runner.run_numpy(items)
    compute, copy = [], []
    for _ in range(max(1, repeats)):
        runner.run_numpy(items)
        assert runner.last_timing is not None
        compute.append(runner.last_timing.compute_s * 1e3)
        copy.append(runner.last_timing.copy_s * 1e3)
    return statistics.median(compute), statistics.median(copy)


def agreement_cases(model: str = AGREEMENT_MODEL, *, device: str, batch: int = AGREEMENT_BATCH,
                    resolution: int | None = None, warmup: int = 3, repeats: int = 10,
                    seed: int = 0) -> list[Agreement]:
    """Profile sum vs runner time for ``batch`` requests at cut 0, and half at cut 0 + half at the middle cut.

    The profile is measured at exactly the batch sizes the blocks then run at (``batch // 2`` before the
    middle cut, ``batch`` from it on), so no interpolation enters the comparison. The runner shares this
    process's cuDNN autotuning cache with the profiler (same shapes), so its warm-up is short.
    """
    half = max(1, batch // 2)
    sizes = sorted({half, batch})
    rows = measure_model(model, device=device, batches=sizes, resolution=resolution, warmup=warmup,
                         repeats=repeats, seed=seed)
    per_block = dict(zip(sizes, rows, strict=True))
    runner = FragmentRunner(model, resolution=resolution, device=device, seed=seed)
    mid = runner.n_blocks // 2
    rng = np.random.default_rng(seed)

    def requests(cut: int, k: int) -> list[Item]:
        return [(cut, rng.standard_normal(runner.info.cut_shape(cut), dtype=np.float32)) for _ in range(k)]

    compositions = [
        (f"{batch}@cut0", sum(per_block[batch]), requests(0, batch)),
        (f"{half}@cut0+{batch - half}@cut{mid}", sum(per_block[half][:mid]) + sum(per_block[batch][mid:]),
         requests(0, half) + requests(mid, batch - half)),
    ]
    out = []
    for label, profile_ms, items in compositions:
        runtime_ms, copy_ms = _median_run(runner, items, max(1, warmup), repeats)
        out.append(Agreement(label, profile_ms, runtime_ms, copy_ms))
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    """What the doctor reports of the device this process sees (CUDA only)."""
    free, total = torch.cuda.mem_get_info(device)
    props = torch.cuda.get_device_properties(device)
    cudnn = torch.backends.cudnn
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "free_bytes": int(free),
            "total_bytes": int(total), "sm_count": int(props.multi_processor_count),
            "cudnn_available": bool(cudnn.is_available()),  # type: ignore[no-untyped-call]
            "cudnn_version": cudnn.version(),  # type: ignore[no-untyped-call]
            "cudnn_benchmark": bool(cudnn.benchmark),
            "share": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}


# ------------------------------------------------------------------------------------ child


def _emit(**msg: Any) -> None:
    sys.stdout.write(LINE_TAG + json.dumps(msg) + "\n")
    sys.stdout.flush()


def child(spec: dict[str, Any]) -> int:
    """Run the parts of ``spec`` on its device (default CUDA), reporting each as it finishes."""
    device = torch.device(spec.get("device", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _emit(event="error", part="probe", message="CUDA is not available in the probe process "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
              f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE')!r})")
        return 3
    prepare_device(device)
    code = 0
    for part in ("info", "matmul", "agreement"):
        if part not in spec:
            continue
        try:
            if part == "info":
                value: Any = device_info(device)
            elif part == "matmul":
                value = matmul_tflops(device, **spec["matmul"])
            else:
                value = [asdict(c) for c in agreement_cases(device=str(device), **spec["agreement"])]
        except Exception as exc:  # one broken part must not hide the others
            _emit(event="error", part=part, message=f"{type(exc).__name__}: {exc}")
            code = 4
            continue
        _emit(event="part", part=part, value=value)
    return code


def run_probe(spec: dict[str, Any], share: int, *, device_index: int = 0,
              timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run ``spec`` in a child with the environment of a replica on ``gpu{device_index}`` at ``share``%."""
    env = share_env(Device("gpu", device_index), share)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "tools.doctor.probes", json.dumps(spec)]
    result = ProbeResult(share)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        result.errors["probe"] = f"the {share}% probe did not finish within {timeout_s:g} s"
        result.stderr_tail = exc.stderr.decode()[-2000:] if isinstance(exc.stderr, bytes) else ""
    else:
        stdout = proc.stdout
        result.exit_code, result.stderr_tail = proc.returncode, proc.stderr[-2000:]
    for line in stdout.splitlines():
        if not line.startswith(LINE_TAG):
            continue  # anything a library prints on stdout
        msg = json.loads(line[len(LINE_TAG):])
        if msg.get("event") == "part":
            result.parts[str(msg["part"])] = msg["value"]
        elif msg.get("event") == "error":
            result.errors[str(msg.get("part", "probe"))] = str(msg["message"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m tools.doctor.probes SPEC_JSON\n")
        return 2
    return child(json.loads(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())

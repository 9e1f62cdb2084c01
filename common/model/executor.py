"""Fragment execution with re-aligned batches (design.md section 2).

A worker serves every fragment ``(model, cut)`` of its group with one ``FragmentRunner``. A batch
mixes requests of different cuts: the ones with the smallest cut start, and each other request joins
the running batch at its own cut, so every block from the largest cut on runs once for the whole
batch. A request never runs a block twice, and its output equals running the whole model on its input.

Request tensors are per request: shaped like ``ModelInfo.cut_shape(cut)`` (no batch dim); a leading
batch dim of 1 (the wire's ``[1, C, H, W]``) is also accepted and dropped. Outputs come back per
request, without a batch dim, in the order of the items given.

Every batch is timed as the profiler times blocks (``common.model.timing``): all inputs are staged on
the device first (stacked per cut, copied host→device), then the device is synchronised and the
clock runs from the first block's launch to the last block's end (synchronised again); the output's
copy back to the host is timed apart. ``last_timing`` (``last_compute_s``, ``last_copy_s``) holds the
latest batch's figures: the compute span is what a replica feeds its latency model, so its
``measured / profile`` ratio compares like with like. On CUDA, ``warm_up`` runs every batch size a
replica may be assigned, so cuDNN autotuning (on in profiler and replicas alike) never lands on a real
batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from common.contract.errors import BadCut, BadTensor
from common.model import timing
from common.model.optimize import inference_blocks
from common.model.timing import BatchTiming, prepare_device, synchronize
from common.model.zoo import ModelInfo, build_blocks, describe

Item: TypeAlias = tuple[int, torch.Tensor | npt.NDArray[Any]]
WARM_BATCH = 32  # the largest batch a CUDA warm-up runs when no profile says otherwise


def realigned_schedule(cuts: Sequence[int], n_blocks: int) -> list[tuple[int, int]]:
    """``(j, b_j)`` for each block j from the smallest cut to N-1: how many requests block j runs on.

    ``b_j`` counts the requests whose cut is ≤ j — the batch sizes of the latency sum L(batch, g).
    """
    if not cuts:
        return []
    for c in cuts:
        if not 0 <= c < n_blocks:
            raise BadCut(f"cut {c} is not valid for a model of {n_blocks} blocks (0..{n_blocks - 1})", cut=c)
    joining = Counter(cuts)
    schedule: list[tuple[int, int]] = []
    b = 0
    for j in range(min(cuts), n_blocks):
        b += joining.get(j, 0)
        schedule.append((j, b))
    return schedule


class FragmentRunner:
    """The blocks ``min_cut..N-1`` of one model, ready to run fragments that start at any cut ≥ min_cut.

    Blocks before ``min_cut`` are built (the seeded weights must be drawn in the same order in every
    process) and then dropped, so a worker only holds what its group needs.
    """

    def __init__(self, model: str, min_cut: int = 0, *, resolution: int | None = None, device: str = "cpu",
                 weights: str | Path | None = None, seed: int = 0, num_classes: int = 1000,
                 optimize: bool = True) -> None:
        self.info: ModelInfo = describe(model, resolution, num_classes=num_classes)
        self.info.check_cut(min_cut)
        self._min_cut = min_cut
        self._device = torch.device(device)
        blocks = build_blocks(model, resolution=self.info.resolution, weights=weights, seed=seed,
                              num_classes=num_classes)
        held = blocks[min_cut:]
        self._parameter_bytes = sum(p.numel() * p.element_size() for b in held for p in b.parameters())
        # On the CPU, TorchScript-optimised where exact (common.model.optimize), as the profiler times them.
        self._blocks: tuple[nn.Module, ...] = inference_blocks(held, self.info, self._device,
                                                              first=min_cut, optimize=optimize)
        del blocks, held
        self.last_timing: BatchTiming | None = None  # the latest batch's (None: none ran, or it failed)

    @property
    def last_compute_s(self) -> float | None:
        """The latest batch's compute span in seconds (the quantity a block's profile measures)."""
        return None if self.last_timing is None else self.last_timing.compute_s

    @property
    def last_copy_s(self) -> float:
        """The latest batch's host↔device copies (and input stacking) in seconds; ~0 on the CPU."""
        return 0.0 if self.last_timing is None else self.last_timing.copy_s

    @property
    def model(self) -> str:
        return self.info.name

    @property
    def n_blocks(self) -> int:
        return self.info.n_blocks

    @property
    def min_cut(self) -> int:
        return self._min_cut

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        """The blocks held: ``blocks[i]`` is block ``min_cut + i``."""
        return self._blocks

    def parameter_bytes(self) -> int:
        """Bytes of the weights held (counted before optimisation: frozen blocks keep them as constants)."""
        return self._parameter_bytes

    def _check_cut(self, cut: int) -> None:
        self.info.check_cut(cut)
        if cut < self._min_cut:
            raise BadCut(f"cut {cut} is below this runner's first block {self._min_cut} ({self.model})",
                         model=self.model, cut=cut)

    def run_range(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Blocks ``start..end-1`` on a batch ``x`` (leading batch dim); ``x`` is not modified."""
        if not self._min_cut <= start <= end <= self.n_blocks:
            raise BadCut(f"block range {start}..{end} is outside {self._min_cut}..{self.n_blocks} "
                         f"({self.model})", model=self.model, cut=start)
        with torch.inference_mode():
            h = x.to(self._device)
            for j in range(start, end):
                h = self._blocks[j - self._min_cut](h)
        return h

    def _request_tensor(self, cut: int, value: torch.Tensor | npt.NDArray[Any]) -> torch.Tensor:
        t = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        if not isinstance(t, torch.Tensor):
            raise BadTensor(f"request tensor must be a tensor or ndarray, got {type(value).__name__}")
        want = self.info.cut_shape(cut)
        if t.dim() == len(want) + 1 and t.shape[0] == 1:
            t = t[0]
        if tuple(t.shape) != want or t.dtype != torch.float32:
            raise BadTensor(f"{self.model} at cut {cut} takes float32 {list(want)}, "
                            f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}",
                            model=self.model, cut=cut)
        return t

    def _stage(self, items: Sequence[Item]) -> tuple[dict[int, torch.Tensor], list[int]]:
        """Each cut's joining requests, stacked and on the device; per item, its row in the batch output."""
        by_cut: dict[int, list[int]] = {}
        tensors: list[torch.Tensor] = []
        for i, (cut, value) in enumerate(items):
            self._check_cut(int(cut))
            tensors.append(self._request_tensor(int(cut), value))
            by_cut.setdefault(int(cut), []).append(i)
        rows = [0] * len(items)
        joining: dict[int, torch.Tensor] = {}
        start = 0
        for cut in sorted(by_cut):  # requests join the running batch in the order of their cuts
            for k, i in enumerate(by_cut[cut]):
                rows[i] = start + k
            start += len(by_cut[cut])
            # torch.stack copies, so no block ever sees the caller's memory.
            joining[cut] = torch.stack([tensors[i] for i in by_cut[cut]]).to(self._device)
        return joining, rows

    def _compute(self, schedule: Sequence[tuple[int, int]], joining: dict[int, torch.Tensor]) -> torch.Tensor:
        h: torch.Tensor | None = None
        for j, b in schedule:
            if j in joining:
                h = joining[j] if h is None else torch.cat([h, joining[j]])
            assert h is not None and h.shape[0] == b
            h = self._blocks[j - self._min_cut](h)
        assert h is not None
        return h

    def _run_batch(self, items: Sequence[Item]) -> tuple[torch.Tensor, list[int], float, float]:
        """Run a re-aligned batch: its output, per item its row in that output, upload and compute seconds."""
        self.last_timing = None
        with torch.inference_mode():
            t0 = timing.clock()
            joining, rows = self._stage(items)
            schedule = realigned_schedule([int(c) for c, _ in items], self.n_blocks)
            synchronize(self._device)
            t1 = timing.clock()
            out = self._compute(schedule, joining)
            synchronize(self._device)
            t2 = timing.clock()
        return out, rows, t1 - t0, t2 - t1

    def run_realigned(self, items: Sequence[Item]) -> list[torch.Tensor]:
        """Outputs (per request, on this runner's device) in the order of ``items``; see the module doc."""
        if not items:
            self.last_timing = BatchTiming(0.0, 0.0)
            return []
        out, rows, upload_s, compute_s = self._run_batch(items)
        self.last_timing = BatchTiming(compute_s, upload_s)
        return [out[r] for r in rows]

    def run_numpy(self, items: Sequence[Item]) -> list[npt.NDArray[np.float32]]:
        """``run_realigned`` for workers: one device-to-host copy for the batch, one array per request."""
        if not items:
            self.last_timing = BatchTiming(0.0, 0.0)
            return []
        out, rows, upload_s, compute_s = self._run_batch(items)
        t0 = timing.clock()
        host: npt.NDArray[np.float32] = out.cpu().numpy()
        self.last_timing = BatchTiming(compute_s, upload_s, timing.clock() - t0)
        return [host[r] for r in rows]


def warm_up(runner: FragmentRunner, max_batch: int = WARM_BATCH) -> None:
    """Run what lazy initialisation and cuDNN autotuning need before a real batch does.

    Turns autotuning on (``timing.prepare_device``) for a CUDA runner. Everywhere: one small mixed batch. On CUDA also every batch size ``1..max_batch`` from the
    runner's first block: autotuning runs once per input shape, and block ``j`` of a re-aligned batch
    may see any ``b_j`` up to the batch size — each run of size ``b`` tunes every block at ``b``.
    """
    prepare_device(runner.device)
    first = runner.min_cut
    mid = (first + runner.n_blocks) // 2
    runner.run_numpy([(c, np.zeros(runner.info.cut_shape(c), dtype=np.float32)) for c in (first, first, mid)])
    if torch.device(runner.device).type != "cuda":
        return
    one = np.zeros(runner.info.cut_shape(first), dtype=np.float32)
    for b in range(1, max(1, max_batch) + 1):
        runner.run_numpy([(first, one)] * b)

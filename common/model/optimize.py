"""CPU inference blocks: each block traced, frozen and optimised by TorchScript, checked against itself.

On the CPU a block run as eager PyTorch modules pays for every batch-norm and activation as its own
pass over memory, and for oneDNN re-laying out the weights of every convolution on every call.
``torch.jit.optimize_for_inference`` folds batch-norm into the convolutions, fuses the activations and
keeps the weights pre-packed in oneDNN's layout. On this project's CPU host that made MobileNetV2's
blocks 1.7× (batch 4) to 2.6× (batch 8) faster, summed over the blocks at 112 px, one thread.

Re-aligned execution needs every block to take any batch size, so each optimised block is checked
against its eager module at batch sizes other than the one it was traced at, and a block that fails
to trace or to agree stays eager (logged, never an error). Profiles (``common.profiling.measure``) and
replicas (``FragmentRunner``) both build their blocks through :func:`inference_blocks`, so a profile
times exactly the modules a replica runs. CUDA blocks stay eager (cuDNN already fuses and autotunes).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import structlog
import torch
from torch import nn

from common.model.zoo import ModelInfo

log = structlog.get_logger("graft.model")

TRACE_BATCH = 2  # traced at one size, checked at others (re-aligned batches take any size)
CHECK_BATCHES = (1, 3)
RTOL, ATOL = 1e-3, 1e-4


def _agrees(eager: nn.Module, fast: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> bool:
    for b in CHECK_BATCHES:
        x = torch.randn((b, *shape), generator=gen)
        want, got = eager(x), fast(x)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return False
        # Relative to the output's scale: random-init outputs range from 1e-14 to 1e12.
        scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny) if want.numel() else 1.0
        if not torch.allclose(got / scale, want / scale, rtol=RTOL, atol=ATOL):
            return False
    return True


def optimize_block(block: nn.Module, in_shape: tuple[int, ...], *, seed: int = 0) -> nn.Module | None:
    """``block`` traced at batch ``TRACE_BATCH`` on per-request input ``in_shape``, frozen and optimised
    for CPU inference; None when tracing fails or the result disagrees with ``block`` at another batch."""
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notices
            example = torch.randn((TRACE_BATCH, *in_shape), generator=gen)
            traced = torch.jit.trace(block.eval(), example)  # type: ignore[no-untyped-call]
            fast = torch.jit.optimize_for_inference(traced)
            return fast if _agrees(block, fast, in_shape, gen) else None
    except Exception:
        return None


def inference_blocks(blocks: Sequence[nn.Module], info: ModelInfo, device: torch.device, *,
                     first: int = 0, optimize: bool = True) -> tuple[nn.Module, ...]:
    """``blocks`` (block ``first + i`` at ``i``) on ``device``; on the CPU, optimised where that is exact."""
    placed = [b.to(device) for b in blocks]
    if not optimize or device.type != "cpu":
        return tuple(placed)
    out: list[nn.Module] = []
    eager: list[int] = []
    for i, block in enumerate(placed):
        fast = optimize_block(block, info.cut_shape(first + i))
        out.append(block if fast is None else fast)
        if fast is None:
            eager.append(first + i)
    if eager:
        log.warning("blocks_left_eager", model=info.name, blocks=eager,
                    reason="tracing failed or the optimised block disagreed with the eager one")
    return tuple(out)

"""CPU blocks optimised by TorchScript: exact where used, eager where tracing would change the answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.model.executor import FragmentRunner
from common.model.optimize import inference_blocks, optimize_block
from common.model.zoo import build_blocks, describe


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def close(got: np.ndarray, want: np.ndarray) -> bool:
    scale = max(float(np.abs(want).max()), float(np.finfo(np.float32).tiny))
    return bool(np.allclose(got / scale, want / scale, rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize(("model", "resolution"), [("mobilenet_v2", 112), ("resnet18", 64)])
def test_optimised_runner_answers_as_the_eager_one_at_every_batch_and_cut(model: str, resolution: int) -> None:
    fast = FragmentRunner(model, resolution=resolution)
    eager = FragmentRunner(model, resolution=resolution, optimize=False)
    assert all(isinstance(b, torch.jit.ScriptModule) for b in fast.blocks)
    assert not any(isinstance(b, torch.jit.ScriptModule) for b in eager.blocks)
    rng = np.random.default_rng(3)
    cuts = [0, 2, 2, 5, 7, fast.n_blocks - 1, 0]  # batch sizes per block differ from the traced one
    items = [(c, rng.standard_normal(fast.info.cut_shape(c)).astype(np.float32)) for c in cuts]
    for k in (1, 4, len(items)):
        for got, want in zip(fast.run_numpy(items[:k]), eager.run_numpy(items[:k]), strict=True):
            assert close(got, want)


class BatchTwoOnly(nn.Module):
    """Python control flow on the batch size: a trace at batch 2 would bake in the wrong branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 2 else x + 1


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x}


def test_a_block_that_a_trace_would_change_or_cannot_trace_stays_eager() -> None:
    assert optimize_block(BatchTwoOnly(), (3, 4)) is None
    assert optimize_block(Untraceable(), (3, 4)) is None
    assert optimize_block(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.ReLU()).eval(),
                          (3, 8, 8)) is not None


def test_inference_blocks_keeps_eager_blocks_where_optimising_fails_and_stays_eager_off_cpu() -> None:
    info = describe("resnet18", 64)
    blocks = build_blocks("resnet18", resolution=64)
    odd = BatchTwoOnly()
    mixed = inference_blocks([*blocks[:2], odd], info, torch.device("cpu"))
    assert isinstance(mixed[0], torch.jit.ScriptModule) and mixed[2] is odd
    plain = inference_blocks(blocks[:2], info, torch.device("cpu"), optimize=False)
    assert plain[0] is blocks[0]
    meta = inference_blocks(blocks[:1], info, torch.device("meta"))  # a non-CPU device is never traced
    assert not isinstance(meta[0], torch.jit.ScriptModule)

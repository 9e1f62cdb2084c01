"""Fragment execution: re-aligned mixed-cut batches give each request what it gets alone."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from common.contract.errors import BadCut, BadTensor, UnknownModel
from common.model import executor as executor_module
from common.model.executor import FragmentRunner, Item, realigned_schedule
from common.model.zoo import build_blocks

TEST_RES = {"resnet18": 64, "mobilenet_v2": 64, "densenet121": 64, "inception_v3": 75, "efficientnet_b0": 64}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=sorted(TEST_RES))
def runner(request: pytest.FixtureRequest) -> Iterator[FragmentRunner]:
    torch.set_num_threads(1)
    yield FragmentRunner(request.param, resolution=TEST_RES[request.param])


@pytest.fixture(scope="module")
def resnet18() -> FragmentRunner:
    torch.set_num_threads(1)
    return FragmentRunner("resnet18", resolution=64)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """fp32 agreement relative to the output's scale (random-init outputs range from 1e-14 to 1e8)."""
    scale = want.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.allclose(got / scale, want / scale, rtol=1e-4, atol=1e-5)


def _prefixes(runner: FragmentRunner, x: torch.Tensor) -> list[torch.Tensor]:
    """prefixes[c] = what a device uploads at cut c (batch dim kept)."""
    out = [x]
    for j in range(runner.n_blocks - 1):
        out.append(runner.run_range(out[-1], j, j + 1))
    return out


# ----------------------------------------------------------------------------------- schedule


def test_schedule_counts_requests_that_have_joined() -> None:
    assert realigned_schedule([3, 1, 1, 5], 7) == [(1, 2), (2, 2), (3, 3), (4, 3), (5, 4), (6, 4)]
    assert realigned_schedule([0], 3) == [(0, 1), (1, 1), (2, 1)]
    assert realigned_schedule([2, 2], 3) == [(2, 2)]
    assert realigned_schedule([], 5) == []
    for bad in ([5], [-1], [0, 7]):
        with pytest.raises(BadCut):
            realigned_schedule(bad, 5)


@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), min_size=1))))
def test_schedule_properties(case: tuple[int, list[int]]) -> None:
    n, cuts = case
    schedule = realigned_schedule(cuts, n)
    assert [j for j, _ in schedule] == list(range(min(cuts), n))
    sizes = [b for _, b in schedule]
    assert sizes == sorted(sizes) and sizes[-1] == len(cuts)
    assert all(b == sum(c <= j for c in cuts) for j, b in schedule)


# ----------------------------------------------------------------------------------- re-alignment


def test_mixed_cuts_get_what_they_get_alone(runner: FragmentRunner) -> None:
    n = runner.n_blocks
    r = runner.info.resolution
    x = torch.randn(6, 3, r, r, generator=torch.Generator().manual_seed(5))
    prefixes = _prefixes(runner, x)
    # Requests arrive out of cut order, with repeated cuts, the first and the last cut.
    cuts = [n // 2, 0, n - 1, 2, n // 2, 0]
    items = [(c, prefixes[c][i]) for i, c in enumerate(cuts)]
    kept = [t.clone() for _, t in items]
    outs = runner.run_realigned(items)
    assert len(outs) == len(items)
    for i, (c, t) in enumerate(items):
        alone = runner.run_range(prefixes[c][i : i + 1], c, n)[0]
        assert outs[i].shape == (1000,)
        assert close(outs[i], alone), (runner.model, i, c)
        assert torch.equal(t, kept[i]), f"input of request {i} was modified"
    # Requests differ, so a mix-up of the order would show.
    assert not close(outs[0], outs[4])


def test_numpy_items_and_a_leading_batch_dim_of_one(resnet18: FragmentRunner) -> None:
    n = resnet18.n_blocks
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    prefixes = _prefixes(resnet18, x)
    items: list[Item] = [(5, prefixes[5][0].numpy().copy()), (2, prefixes[2][1:2].numpy().copy()), (0, prefixes[0][2])]
    kept = [torch.as_tensor(v).clone() for _, v in items]
    arrays = resnet18.run_numpy(items)
    tensors = resnet18.run_realigned(items)
    for i, (c, _) in enumerate(items):
        alone = resnet18.run_range(prefixes[c][i : i + 1], c, n)[0]
        assert isinstance(arrays[i], np.ndarray) and arrays[i].shape == (1000,)
        assert close(torch.from_numpy(arrays[i]), alone)
        assert torch.equal(tensors[i], torch.from_numpy(arrays[i]))
        assert torch.equal(torch.as_tensor(items[i][1]), kept[i])
    assert resnet18.run_realigned([]) == [] and resnet18.run_numpy([]) == []


def test_an_inplace_entry_block_does_not_touch_the_callers_tensor(resnet18: FragmentRunner) -> None:
    # Block 2 is resnet's stem ReLU, in-place in torchvision.
    assert resnet18.info.blocks[2].name == "relu"
    h = torch.randn(1, *resnet18.info.cut_shape(2))
    kept = h.clone()
    resnet18.run_range(h, 2, 3)
    resnet18.run_realigned([(2, h[0])])
    assert torch.equal(h, kept)


def test_bad_requests(resnet18: FragmentRunner) -> None:
    good = torch.zeros(resnet18.info.cut_shape(4))
    with pytest.raises(BadTensor, match="float32"):
        resnet18.run_realigned([(4, good.double())])
    with pytest.raises(BadTensor):
        resnet18.run_realigned([(4, torch.zeros(3, 64, 64))])
    with pytest.raises(BadTensor):
        resnet18.run_realigned([(4, good.unsqueeze(0).repeat(2, 1, 1, 1))])
    with pytest.raises(BadCut):
        resnet18.run_realigned([(resnet18.n_blocks, good)])
    with pytest.raises(BadCut):
        resnet18.run_range(good.unsqueeze(0), 4, resnet18.n_blocks + 1)
    with pytest.raises(UnknownModel):
        FragmentRunner("lenet")
    with pytest.raises(BadCut):
        FragmentRunner("resnet18", min_cut=14, resolution=64)


# ----------------------------------------------------------------------------------- min_cut


def test_min_cut_keeps_only_the_suffix_and_frees_the_rest(monkeypatch: pytest.MonkeyPatch,
                                                          resnet18: FragmentRunner) -> None:
    built: list[weakref.ref[nn.Module]] = []

    def tracking_build(*args: object, **kwargs: object) -> list[nn.Module]:
        blocks = build_blocks(*args, **kwargs)  # type: ignore[arg-type]
        built.extend(weakref.ref(b) for b in blocks)
        return blocks

    monkeypatch.setattr(executor_module, "build_blocks", tracking_build)
    min_cut = 8
    suffix = FragmentRunner("resnet18", min_cut, resolution=64)
    gc.collect()
    assert suffix.min_cut == min_cut and suffix.n_blocks == 14 and len(suffix.blocks) == 14 - min_cut
    assert all(ref() is None for ref in built[:min_cut]), "blocks before min_cut are still alive"
    eager = FragmentRunner("resnet18", min_cut, resolution=64, optimize=False)
    assert all(ref() is not None for ref in built[-(14 - min_cut):]), "the eager suffix holds its own blocks"
    assert eager.parameter_bytes() == suffix.parameter_bytes()
    full_bytes = sum(p.numel() * 4 for b in eager.blocks for p in b.parameters())
    assert suffix.parameter_bytes() == full_bytes < resnet18.parameter_bytes()

    # Same seed, same weights: the suffix runner answers exactly as the full one.
    x = torch.randn(2, *resnet18.info.cut_shape(10), generator=torch.Generator().manual_seed(8))
    assert torch.equal(suffix.run_range(x, 10, 14), resnet18.run_range(x, 10, 14))
    mixed = [(10, x[0]), (8, torch.randn(*resnet18.info.cut_shape(8))), (10, x[1])]
    for a, b in zip(suffix.run_realigned(mixed), resnet18.run_realigned(mixed), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(BadCut, match="below"):
        suffix.run_realigned([(7, torch.zeros(resnet18.info.cut_shape(7)))])
    with pytest.raises(BadCut):
        suffix.run_range(x, 7, 14)
    assert suffix.device == "cpu" and suffix.model == "resnet18"

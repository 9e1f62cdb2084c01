"""The model registry: block lists that compose to torchvision's own model(x), at every cut."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from common.contract.errors import BadCut, UnknownModel
from common.model.zoo import (
    MIN_RESOLUTION,
    MODEL_NAMES,
    build_blocks,
    default_resolution,
    describe,
    resolve_resolution,
    split_model,
    torchvision_reference,
)

# Small inputs keep the file fast: vgg runs at its minimum, inception needs at least 75 pixels.
TEST_RES = {name: {"inception_v3": 75, "vgg16": 32, "vgg19": 32}.get(name, 64) for name in MODEL_NAMES}


@dataclass
class Built:
    name: str
    blocks: list[nn.Module]
    x: torch.Tensor
    expected: torch.Tensor  # torchvision's own model(x), computed before the model was split


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def built(request: pytest.FixtureRequest) -> Iterator[Built]:
    """Each model built once for the module (vgg's random init alone takes seconds)."""
    torch.set_num_threads(1)
    name: str = request.param
    reference = torchvision_reference(name)
    r = TEST_RES[name]
    x = torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(x)
    yield Built(name, split_model(name, reference), x, expected)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """fp32 agreement relative to the output's scale (random-init outputs range from 1e-14 to 1e8)."""
    scale = want.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.allclose(got / scale, want / scale, rtol=1e-4, atol=1e-5)


def _run(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        for block in blocks:
            x = block(x)
    return x


def test_full_chain_equals_torchvision_model(built: Built) -> None:
    got = _run(built.blocks, built.x)
    assert got.shape == (2, 1000)
    assert torch.isfinite(got).all() and got.abs().max() > 0
    diff = (got - built.expected).abs().max().item()
    assert torch.equal(got, built.expected), f"{built.name}: max diff {diff}"
    assert all(not b.training for b in built.blocks)


def test_every_cut_composes_and_never_mutates_its_input(built: Built) -> None:
    name, blocks = built.name, built.blocks
    info = describe(name, TEST_RES[name])
    assert info.n_blocks == len(blocks)
    r = TEST_RES[name]
    # Negative values matter: an in-place ReLU at a fragment's entry would clamp them in the caller's tensor.
    x = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(2))
    prefix_outputs = [x]
    for block in blocks:
        prefix_outputs.append(_run([block], prefix_outputs[-1]))
    final = prefix_outputs[-1]
    for cut in info.cuts:
        received = prefix_outputs[cut]
        assert tuple(received.shape[1:]) == info.cut_shape(cut), (name, cut)
        kept = received.clone()
        suffix = _run(blocks[cut:], received)
        assert torch.equal(received, kept), f"{name}: block {cut} ({info.blocks[cut].name}) wrote its input"
        assert close(suffix, final), (name, cut)


def test_minimum_resolution_is_tight(built: Built) -> None:
    name, blocks = built.name, built.blocks
    low = MIN_RESOLUTION[name]
    assert _run(blocks, torch.randn(1, 3, low, low)).shape == (1, 1000)
    if low > 1:
        with pytest.raises(RuntimeError):
            _run(blocks, torch.randn(1, 3, low - 1, low - 1))
        with pytest.raises(ValueError, match="minimum"):
            describe(name, low - 1)


def test_describe_matches_the_design_example_for_resnet50() -> None:
    info = describe("resnet50")
    assert info.resolution == 224 and info.input_shape == (3, 224, 224) and info.input_bytes == 602112
    conv1 = info.blocks[0]
    # 118,013,952 multiply-adds (64·3·7·7 per output pixel, 112² pixels), counted twice as torch does.
    assert (conv1.name, conv1.out_shape, conv1.out_bytes, conv1.flops) == (
        "conv1", (64, 112, 112), 3211264, 2 * 118013952)
    assert [b.name for b in info.blocks[:5]] == ["conv1", "bn1", "relu", "maxpool", "layer1.0"]
    assert info.blocks[-1].name == "fc" and info.blocks[-1].out_shape == (1000,)
    assert info.n_blocks == 22


@pytest.mark.parametrize(("name", "gmacs"), [("resnet50", 4.09), ("vgg16", 15.47), ("alexnet", 0.71),
                                              ("mobilenet_v2", 0.30), ("densenet121", 2.83)])
def test_flops_agree_with_published_multiply_adds(name: str, gmacs: float) -> None:
    # The papers' GMACs at 224 px; torch counts a multiply-add as 2 FLOPs.
    total = describe(name).total_flops
    assert total / 2e9 == pytest.approx(gmacs, rel=0.03)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_describe_is_consistent(name: str) -> None:
    info = describe(name, TEST_RES[name])
    assert describe(name, TEST_RES[name]) is info  # cached
    assert len({b.name for b in info.blocks}) == info.n_blocks
    assert all(b.out_bytes == 4 * torch.Size(b.out_shape).numel() for b in info.blocks)
    assert info.upload_bytes(0) == info.input_bytes and info.cut_shape(0) == info.input_shape
    for c in range(1, info.n_blocks):
        assert info.upload_bytes(c) == info.blocks[c - 1].out_bytes
        assert info.device_flops(c) + info.server_flops(c) == info.total_flops
    assert info.total_flops > 0
    for bad in (-1, info.n_blocks):
        with pytest.raises(BadCut):
            info.cut_shape(bad)
        with pytest.raises(BadCut):
            info.upload_bytes(bad)


def test_default_resolutions() -> None:
    assert default_resolution("inception_v3") == 299
    assert all(default_resolution(n) == 224 for n in MODEL_NAMES if n != "inception_v3")
    assert resolve_resolution("resnet18", None) == resolve_resolution("resnet18", 0) == 224
    assert describe("inception_v3").input_shape == (3, 299, 299)


def test_unknown_model() -> None:
    for call in (lambda: build_blocks("lenet"), lambda: describe("lenet"), lambda: default_resolution("lenet")):
        with pytest.raises(UnknownModel) as err:
            call()
        assert err.value.code == "UNKNOWN_MODEL"


def _digest(blocks: list[nn.Module]) -> str:
    h = hashlib.sha256()
    for block in blocks:
        for key, tensor in block.state_dict().items():
            h.update(key.encode())
            h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_builds_are_deterministic_and_leave_the_callers_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    first, second = build_blocks("mobilenet_v2"), build_blocks("mobilenet_v2")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _digest(first) == _digest(second)
    assert _digest(build_blocks("mobilenet_v2", seed=1)) != _digest(first)
    assert _digest(split_model("mobilenet_v2", torchvision_reference("mobilenet_v2"))) == _digest(first)
    assert all(not b.training for b in first)


def test_another_process_builds_bit_identical_weights() -> None:
    code = (
        "import hashlib, torch\n"
        "from common.model.zoo import build_blocks\n"
        "h = hashlib.sha256()\n"
        "for b in build_blocks('mobilenet_v2'):\n"
        "    for k, t in b.state_dict().items():\n"
        "        h.update(k.encode()); h.update(t.contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root, timeout=100)
    assert out.stdout.strip() == _digest(build_blocks("mobilenet_v2"))


def test_local_weights_are_loaded(tmp_path: Path) -> None:
    other = torchvision_reference("resnet18", seed=7, num_classes=10)
    path = tmp_path / "resnet18.pt"
    torch.save(other.state_dict(), path)
    blocks = build_blocks("resnet18", weights=path, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(_run(blocks, x), other(x))
    with pytest.raises(ValueError, match="do not fit"):
        build_blocks("resnet18", weights=path)  # 1000 classes expected
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load"):
        build_blocks("resnet18", weights=tmp_path / "junk.pt")


def test_checkpoint_quirks_inception_aux_and_old_densenet_keys(tmp_path: Path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    assert any(k.startswith("AuxLogits.") for k in inception.state_dict())
    torch.save(inception.state_dict(), tmp_path / "inception.pt")
    blocks = build_blocks("inception_v3", weights=tmp_path / "inception.pt")
    assert torch.equal(blocks[0].get_parameter("conv.weight"), inception.Conv2d_1a_3x3.conv.weight)

    dense = torchvision_reference("densenet121", seed=4)
    # torchvision's published densenet checkpoints spell 'norm1' as 'norm.1'.
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v for k, v in dense.state_dict().items()}
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "densenet.pt")
    blocks = build_blocks("densenet121", weights=tmp_path / "densenet.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(_run(blocks, x), dense(x))

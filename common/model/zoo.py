"""The model registry: torchvision architectures as ordered block lists (design.md sections 1-2).

Running blocks ``0..N-1`` in order equals the torchvision model's ``model(x)`` in eval mode; a cut ``c``
means the device ran blocks ``0..c-1`` and the server runs ``c..N-1``. Everything ``forward()`` does
inline (flatten, densenet's functional ReLU + pooling, mobilenet's functional pooling) is an explicit
block here, so no computation hides between blocks.

Choices that matter to callers:

* Weights are random unless a local state dict is given, drawn right after ``torch.manual_seed(seed)``
  inside a forked RNG, so every process that builds ``(name, seed)`` gets bit-identical weights and
  the caller's RNG state is left alone.
* ``inception_v3`` is built with ``aux_logits=False`` (the aux head only runs in training) and
  ``transform_input=False``: inputs are expected already normalised, as for every other model, so
  the first block is ``Conv2d_1a_3x3``.
* No block may write into its input: a fragment's first block receives the caller's tensor, so any
  in-place activation a block starts with is made out-of-place (same values, one extra allocation).
* ``describe`` runs on the meta device: shapes and FLOPs without allocating or computing weights.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.efficientnet import MBConv

from common.contract.errors import BadCut, UnknownModel
from common.model.shapes import served_resolution

MODEL_NAMES: tuple[str, ...] = (
    "resnet50", "vgg16", "vgg19", "alexnet", "mobilenet_v2", "inception_v3", "densenet121",
    "efficientnet_b0", "resnet18",
)

FP32_BYTES = 4


# Smallest square input each architecture accepts (found by running each on the meta device; below
# it a stride-2 convolution or pooling runs out of pixels). tests/test_models.py checks these are tight.
MIN_RESOLUTION: dict[str, int] = {
    "resnet50": 1, "resnet18": 1, "vgg16": 32, "vgg19": 32, "alexnet": 63, "mobilenet_v2": 1,
    "inception_v3": 75, "densenet121": 29, "efficientnet_b0": 1,
}

NamedBlocks = list[tuple[str, nn.Module]]


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}", model=name)


def default_resolution(name: str) -> int:
    _check_name(name)
    return served_resolution(name, None)


def resolve_resolution(name: str, resolution: int | None) -> int:
    """``None`` or 0 means the model's default; anything below the model's minimum is refused."""
    _check_name(name)
    res = default_resolution(name) if not resolution else int(resolution)
    if res < MIN_RESOLUTION[name]:
        raise ValueError(f"resolution {res} is below {name}'s minimum of {MIN_RESOLUTION[name]}")
    return res


# ------------------------------------------------------------------------------------ splitting


def _conv_stack(features: nn.Sequential, numbered: bool) -> NamedBlocks:
    """vgg/alexnet ``features``: each conv with its ReLU is one block, each max-pool another.

    ``numbered`` names convs globally (alexnet: conv1..conv5); otherwise per stage (vgg: conv3_2).
    """
    blocks: NamedBlocks = []
    stage, in_stage, total = 1, 0, 0
    mods = list(features)
    i = 0
    while i < len(mods):
        mod = mods[i]
        if isinstance(mod, nn.MaxPool2d):
            blocks.append((f"pool{stage if not numbered else total}", mod))
            stage, in_stage = stage + 1, 0
            i += 1
            continue
        if not isinstance(mod, nn.Conv2d):
            raise TypeError(f"unexpected {type(mod).__name__} in a conv stack")
        in_stage, total = in_stage + 1, total + 1
        pair: list[nn.Module] = [mod]
        if i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
            pair.append(mods[i + 1])
            i += 1
        blocks.append((f"conv{total}" if numbered else f"conv{stage}_{in_stage}", nn.Sequential(*pair)))
        i += 1
    return blocks


def _fc_head(classifier: nn.Sequential, first: int) -> NamedBlocks:
    """Classifier pieces fc{first}, fc{first+1}, ...: each ends after a Linear and its activation.

    The first piece starts with the ``torch.flatten(x, 1)`` the model's ``forward()`` does inline.
    """
    pieces: list[list[nn.Module]] = [[nn.Flatten(1)]]
    mods = list(classifier)
    for i, mod in enumerate(mods):
        pieces[-1].append(mod)
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        ends = isinstance(mod, nn.ReLU) or (isinstance(mod, nn.Linear) and not isinstance(nxt, nn.ReLU))
        if ends and nxt is not None:
            pieces.append([])
    return [(f"fc{first + k}", nn.Sequential(*p)) for k, p in enumerate(pieces)]


def _split_resnet(m: torchvision.models.ResNet) -> NamedBlocks:
    blocks: NamedBlocks = [("conv1", m.conv1), ("bn1", m.bn1), ("relu", m.relu), ("maxpool", m.maxpool)]
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        blocks += [(f"{lname}.{i}", b) for i, b in enumerate(getattr(m, lname))]
    return [*blocks, ("avgpool", m.avgpool), ("fc", nn.Sequential(nn.Flatten(1), m.fc))]


def _split_vgg(m: torchvision.models.VGG) -> NamedBlocks:
    return [*_conv_stack(m.features, numbered=False), ("avgpool", m.avgpool), *_fc_head(m.classifier, 6)]


def _split_alexnet(m: torchvision.models.AlexNet) -> NamedBlocks:
    return [*_conv_stack(m.features, numbered=True), ("avgpool", m.avgpool), *_fc_head(m.classifier, 6)]


def _split_mobilenet(m: torchvision.models.MobileNetV2) -> NamedBlocks:
    blocks: NamedBlocks = [(f"features.{i}", f) for i, f in enumerate(m.features)]
    pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1))
    return [*blocks, ("pool", pool), ("classifier", m.classifier)]


def _split_efficientnet(m: torchvision.models.EfficientNet) -> NamedBlocks:
    blocks: NamedBlocks = []
    for i, stage in enumerate(m.features):
        # Stages 1..7 are Sequentials of MBConv blocks; one block per MBConv keeps cuts fine-grained.
        if isinstance(stage, nn.Sequential) and all(isinstance(s, MBConv) for s in stage):
            blocks += [(f"features.{i}.{k}", mb) for k, mb in enumerate(stage)]
        else:
            blocks.append((f"features.{i}", stage))
    pool = nn.Sequential(m.avgpool, nn.Flatten(1))
    return [*blocks, ("pool", pool), ("classifier", m.classifier)]


def _split_densenet(m: torchvision.models.DenseNet) -> NamedBlocks:
    blocks: NamedBlocks = list(m.features.named_children())
    # DenseNet.forward applies relu, pooling and flatten functionally after ``features``.
    pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1))
    return [*blocks, ("pool", pool), ("classifier", m.classifier)]


_INCEPTION_BODY = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool",
)


def _split_inception(m: torchvision.models.Inception3) -> NamedBlocks:
    blocks: NamedBlocks = [(n, getattr(m, n)) for n in _INCEPTION_BODY]
    return [*blocks, ("fc", nn.Sequential(m.dropout, nn.Flatten(1), m.fc))]


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    builder: Callable[..., nn.Module] = getattr(torchvision.models, name)
    if name == "inception_v3":
        # init_weights=True explicitly: leaving it None makes torchvision warn.
        return builder(weights=None, num_classes=num_classes, aux_logits=False, transform_input=False,
                       init_weights=True)
    return builder(weights=None, num_classes=num_classes)


_SPLITTERS: dict[str, Callable[[Any], NamedBlocks]] = {
    "resnet50": _split_resnet, "resnet18": _split_resnet, "vgg16": _split_vgg, "vgg19": _split_vgg,
    "alexnet": _split_alexnet, "mobilenet_v2": _split_mobilenet, "inception_v3": _split_inception,
    "densenet121": _split_densenet, "efficientnet_b0": _split_efficientnet,
}


def _leaves(block: nn.Module) -> Iterator[nn.Module]:
    for mod in block.modules():
        if not any(True for _ in mod.children()):
            yield mod


def _make_entry_safe(block: nn.Module) -> None:
    """Turn off ``inplace`` on the activations a block starts with (they would write into its input).

    Leaves run in registration order for the containers used here; the first leaf that computes
    into fresh memory (a conv, a norm, a linear) ends the danger.
    """
    for leaf in _leaves(block):
        if hasattr(leaf, "inplace"):
            setattr(leaf, "inplace", False)  # noqa: B010 - nn.Module's typed __setattr__ rejects a bool
        elif not isinstance(leaf, nn.Flatten | nn.Identity):
            return


# ------------------------------------------------------------------------------------ weights

# Old torchvision densenet checkpoints name 'norm.1' what the module now calls 'norm1'.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _load_state(name: str, model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several unrelated types for unreadable files
        raise ValueError(f"cannot load weights for {name} from {path}: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"weights file {path} does not hold a state dict")
    fixed: dict[str, Any] = {}
    for key, value in state.items():
        if name == "inception_v3" and key.startswith("AuxLogits."):
            continue  # the aux branch is not built (training only)
        if name == "densenet121" and (old := _DENSENET_OLD_KEY.match(key)):
            key = old.group(1) + old.group(2)
        fixed[key] = value
    try:
        model.load_state_dict(fixed, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {path} do not fit {name}: {exc}") from exc


# ------------------------------------------------------------------------------------ building


def torchvision_reference(name: str, *, seed: int = 0, num_classes: int = 1000,
                          weights: str | Path | None = None, meta: bool = False) -> nn.Module:
    """The unsplit torchvision model (eval mode) that ``build_blocks`` splits: same seed, same weights.

    ``meta`` builds it on the meta device (shapes only, nothing allocated).
    """
    _check_name(name)
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        model = _torchvision_model(name, num_classes)
    if weights is not None:
        _load_state(name, model, Path(weights))
    return model.eval()


def _named_split(name: str, model: nn.Module) -> NamedBlocks:
    _check_name(name)
    blocks = _SPLITTERS[name](model)
    for _, block in blocks:
        block.eval()
        _make_entry_safe(block)
    return blocks


def split_model(name: str, model: nn.Module) -> list[nn.Module]:
    """Split a torchvision model of architecture ``name`` into its blocks (they share its modules)."""
    return [b for _, b in _named_split(name, model)]


def build_blocks(name: str, *, resolution: int | None = None, weights: str | Path | None = None,
                 seed: int = 0, num_classes: int = 1000) -> list[nn.Module]:
    """The model's blocks in eval mode, on the CPU; ``resolution`` is only checked against the minimum."""
    resolve_resolution(name, resolution)
    return split_model(name, torchvision_reference(name, seed=seed, num_classes=num_classes, weights=weights))


# ------------------------------------------------------------------------------------ description


@dataclass(frozen=True)
class BlockInfo:
    name: str
    out_shape: tuple[int, ...]  # per request (no batch dim)
    out_bytes: int  # fp32, per request
    flops: int  # per request (batch 1), multiply-adds counted as 2


@dataclass(frozen=True)
class ModelInfo:
    name: str
    resolution: int
    input_shape: tuple[int, ...]
    input_bytes: int
    blocks: tuple[BlockInfo, ...]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def cuts(self) -> range:
        return range(self.n_blocks)

    def check_cut(self, cut: int) -> None:
        if not 0 <= cut < self.n_blocks:
            raise BadCut(f"cut {cut} is not valid for {self.name} (0..{self.n_blocks - 1})",
                         model=self.name, cut=cut)

    def cut_shape(self, cut: int) -> tuple[int, ...]:
        """Per-request shape of the tensor the server receives at this cut."""
        self.check_cut(cut)
        return self.input_shape if cut == 0 else self.blocks[cut - 1].out_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.blocks[-1].out_shape

    def upload_bytes(self, cut: int) -> int:
        self.check_cut(cut)
        return self.input_bytes if cut == 0 else self.blocks[cut - 1].out_bytes

    def device_flops(self, cut: int) -> int:
        """FLOPs the device spends before uploading at this cut (blocks 0..cut-1)."""
        self.check_cut(cut)
        return sum(b.flops for b in self.blocks[:cut])

    def server_flops(self, cut: int) -> int:
        """FLOPs of the fragment the server runs at this cut (blocks cut..N-1)."""
        self.check_cut(cut)
        return sum(b.flops for b in self.blocks[cut:])

    @property
    def total_flops(self) -> int:
        return sum(b.flops for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "resolution": self.resolution, "input_shape": list(self.input_shape),
            "input_bytes": self.input_bytes, "n_blocks": self.n_blocks,
            "blocks": [{"name": b.name, "out_shape": list(b.out_shape), "out_bytes": b.out_bytes,
                        "flops": b.flops} for b in self.blocks],
        }


def describe(name: str, resolution: int | None = None, *, num_classes: int = 1000) -> ModelInfo:
    """Shapes, bytes and FLOPs of every block for one request (batch 1, fp32)."""
    return _describe(name, resolve_resolution(name, resolution), num_classes)


@functools.lru_cache(maxsize=64)
def _describe(name: str, resolution: int, num_classes: int) -> ModelInfo:
    blocks = _named_split(name, torchvision_reference(name, num_classes=num_classes, meta=True))
    input_shape = (3, resolution, resolution)
    x = torch.empty((1, *input_shape), device="meta")
    infos = []
    with torch.inference_mode():
        for block_name, block in blocks:
            with FlopCounterMode(display=False) as counter:
                x = block(x)
            shape = tuple(int(d) for d in x.shape[1:])
            infos.append(BlockInfo(block_name, shape, _numel(shape) * FP32_BYTES, int(counter.get_total_flops())))
    return ModelInfo(name, resolution, input_shape, _numel(input_shape) * FP32_BYTES, tuple(infos))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

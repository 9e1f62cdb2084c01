"""Mobile device classes: how long a phone-class CPU takes to run each block (the client's side of a cut).

A block on a phone costs ``overhead + flops / rate``. The numbers are assumptions of the right order
of magnitude, not measurements of ours: fp32 convnets on a phone CPU (PyTorch Mobile / TFLite CPU
delegate, all big cores) reach a few GFLOP/s on a budget Cortex-A53 part, a few tens on a mid-range
Cortex-A76/A78 part and around a hundred on a flagship Cortex-X part. With FLOPs counted as 2 per
multiply-add (as ``common.model.zoo`` does), MobileNetV2 (0.6 GFLOP) then takes ~150 ms / ~25 ms / ~8 ms
and ResNet-50 (8.2 GFLOP) ~2 s / ~330 ms / ~110 ms — the spread public phone benchmarks report
(e.g. AI-Benchmark's CPU fp32 results). The per-block overhead stands for operator dispatch, memory
allocation and cache misses that FLOPs do not capture; it makes many tiny blocks cost something.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.profiles import DATA_DIR


@dataclass(frozen=True)
class DeviceClass:
    name: str
    gflops: float  # effective fp32 GFLOP/s on convnet layers
    block_overhead_ms: float
    description: str = ""


DEVICE_CLASSES: dict[str, DeviceClass] = {
    "low": DeviceClass("low", 4.0, 0.5, "budget phone, 4× Cortex-A53 class (assumed)"),
    "mid": DeviceClass("mid", 24.0, 0.2, "mid-range phone, Cortex-A76/A78 class (assumed)"),
    "high": DeviceClass("high", 75.0, 0.1, "flagship phone, Cortex-X class prime core cluster (assumed)"),
}

DEVICES_FILE = DATA_DIR / "devices.json"


class _FlopsBlock(Protocol):
    @property
    def flops(self) -> int: ...


class _BlockList(Protocol):
    @property
    def blocks(self) -> Sequence[_FlopsBlock]: ...


def device_class(name: str) -> DeviceClass:
    try:
        return DEVICE_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown device class {name!r} (known: {', '.join(DEVICE_CLASSES)})") from None


def device_block_latency_ms(cls: DeviceClass, flops: float) -> float:
    return cls.block_overhead_ms + flops / (cls.gflops * 1e9) * 1e3


def device_profile(model: _BlockList, cls: DeviceClass) -> list[float]:
    """Per-block latency (ms) on ``cls`` of a ``ModelInfo`` or a ``ModelProfile`` (anything with blocks' flops)."""
    return [device_block_latency_ms(cls, b.flops) for b in model.blocks]


def device_prefix_ms(latencies: Sequence[float], cut: int) -> float:
    """What the device spends before uploading at ``cut``: blocks ``0..cut-1``."""
    return float(sum(latencies[:cut]))


def devices_document(models: Sequence[str] | None = None, resolution: int | None = None) -> dict[str, Any]:
    """The shipped ``devices.json``: class definitions plus per-block latency per class per model."""
    from common.model.zoo import MODEL_NAMES, describe

    doc: dict[str, Any] = {
        "note": "Assumed phone-class CPU speeds (order of magnitude), not measurements; see common/devices.py.",
        "classes": {c.name: {"gflops": c.gflops, "block_overhead_ms": c.block_overhead_ms,
                             "description": c.description} for c in DEVICE_CLASSES.values()},
        "models": {},
    }
    for name in models or MODEL_NAMES:
        info = describe(name, resolution)
        doc["models"][name] = {
            "resolution": info.resolution,
            "blocks": [b.name for b in info.blocks],
            "latency_ms": {c.name: [float(f"{v:.4g}") for v in device_profile(info, c)]
                           for c in DEVICE_CLASSES.values()},
        }
    return doc


def load_device_latencies(path: str | Path = DEVICES_FILE) -> Mapping[str, Mapping[str, list[float]]]:
    """``{model: {class: [per-block ms]}}`` from a devices document."""
    try:
        doc = json.loads(Path(path).read_text())
        return {m: {c: [float(v) for v in lat] for c, lat in d["latency_ms"].items()}
                for m, d in doc["models"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read device latencies from {path}: {exc}") from None

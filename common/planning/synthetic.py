"""Synthetic GPU profiles for planner tests and benchmarks where no real profile is at hand.

Latency follows the form iGniter fits to V100 measurements under MPS (reference/gpu-mps-anchors.md):
``t(b, r) = (k2·b + k3) / (r + k4) + k5`` for batch ``b`` and share ``r`` percent, spread over blocks
by random FLOP weights. With the constants below a model of scale 1 is close to resnet50's anchors
(7.7 / 2.4 ms at batch 1 on 10% / 100%; 180 / 28 ms at batch 32): small batches barely speed up
beyond half a GPU, large batches scale almost inversely with the share. The profile says
``source: estimated`` and ``device: synthetic`` and must never be mistaken for a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.profiles import Profile, make_profile

K2, K3, K4, K5 = 86.6, 6.2, 5.0, 1.5
DEFAULT_MODELS: dict[str, tuple[int, float]] = {  # blocks, scale relative to resnet50
    "resnet50": (18, 1.0), "vgg16": (22, 1.9), "alexnet": (13, 0.25), "mobilenet_v2": (21, 0.35),
}


def synthetic_profile(models: Mapping[str, tuple[int, float]] | None = None, *, seed: int = 0,
                      batches: Sequence[int] = (1, 2, 4, 8, 16, 32),
                      shares: Sequence[int] = tuple(range(10, 101, 10))) -> Profile:
    """A deterministic synthetic profile: ``models`` maps name -> (number of blocks, scale)."""
    rng = np.random.default_rng(seed)
    b = np.asarray(batches, dtype=np.float64)[:, None]
    r = np.asarray(shares, dtype=np.float64)[None, :]
    out: dict[str, Any] = {}
    for name, (n_blocks, scale) in (models or DEFAULT_MODELS).items():
        weights = rng.dirichlet(np.full(n_blocks, 2.0))
        whole = scale * (K2 * b + K3) / (r + K4)  # (batches, shares)
        # activations shrink along the network, with the bumps real architectures have
        out_bytes = (602112 * np.exp(-np.linspace(0.0, 6.0, n_blocks)) * rng.uniform(0.5, 2.0, n_blocks)).astype(int)
        out_bytes[-1] = 4000
        blocks = [{"name": f"b{j}", "out_bytes": int(max(out_bytes[j], 1)), "flops": int(weights[j] * 4e9 * scale),
                   "latency_ms": (weights[j] * whole + K5 * scale / n_blocks).tolist()}
                  for j in range(n_blocks)]
        out[name] = {"input_shape": [3, 224, 224], "input_bytes": 602112, "blocks": blocks}
    return make_profile("estimated", "synthetic", "gpu_share_pct", batches, shares, out, name="synthetic",
                        note="synthetic iGniter-form latencies for tests and benchmarks; not a measurement")

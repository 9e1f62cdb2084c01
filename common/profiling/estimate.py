"""Estimated GPU profiles: an analytic MPS latency model calibrated to published V100 measurements.

Where no GPU is present the planner and the simulator still need ``l_j(b, g)``. This module predicts
it from each block's shape of work, with a handful of global constants fitted by least squares to the
whole-model anchors of ``reference/gpu-mps-anchors.md`` (iGniter's V100 profile: alexnet, resnet50,
vgg19 at batch 1/16/32 × share 10/50/100 %). The form, for a model of ``F`` GFLOP per request spread
over ``K`` compute layers (convolutions and linears: the kernels an inference engine launches once BN
and activations are fused into them), ``W`` GB of weights and ``A`` GB of layer input+output
activations per request, at batch ``b`` and share ``s = g/100``::

    t(b, s) = t0 + K·launch + F·b / (peak · e · u(b, s)) + (W + A·b) / (bw · m(s))

    u(b, s) = softmin_p(s, F·b / (K · fill))     GPU fraction the kernels can occupy: a small batch has
                                                 too few thread blocks to fill the share it is given
    e       = min(1, (F/K / 2 GFLOP)^γ)          big layers (vgg's) reach a larger fraction of peak
                                                 than small ones (resnet's 1×1 convs, alexnet's)
    m(s)    = softmin_8(s / s_mem, 1)            DRAM bandwidth: a few SMs cannot saturate it, but
                                                 beyond ``s_mem`` more SMs add no bandwidth

``softmin_p(x, y) = (x^-p + y^-p)^(-1/p)``. Every term is non-decreasing in ``b`` (the fill term grows
at most linearly) and non-increasing in ``s``, so estimated profiles are monotone. The efficiency ``e``
is the only per-model factor and it comes from a general property (FLOPs per layer), never from a
lookup of the anchors. A block's latency uses the same form with the block's own ``F, K, W, A`` and
the model-level ``u, e, m`` plus ``t0/N``, so block latencies sum to the whole-model estimate.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from common.model.zoo import MODEL_NAMES, describe, split_model, torchvision_reference
from common.profiles import Profile, make_profile

Floats = npt.NDArray[np.float64]

BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
SHARES: tuple[int, ...] = tuple(range(10, 101, 10))
SIGNIFICANT_DIGITS = 4


@dataclass(frozen=True)
class Anchor:
    model: str
    batch: int
    share: int
    ms: float


def _anchor_rows(model: str, rows: Sequence[Sequence[float]]) -> list[Anchor]:
    return [Anchor(model, b, g, ms) for b, row in zip((1, 16, 32), rows, strict=True)
            for g, ms in zip((10, 50, 100), row, strict=True)]


# gpu-mps-anchors.md (iGniter artifact, V100). ssd is left out: it is not in our registry.
V100_ANCHORS: tuple[Anchor, ...] = (
    *_anchor_rows("alexnet", [[3.62, 0.93, 0.71], [16.71, 3.62, 2.07], [30.88, 6.47, 3.60]]),
    *_anchor_rows("resnet50", [[7.69, 2.85, 2.39], [91.70, 20.08, 11.54], [180.47, 38.38, 21.34]]),
    *_anchor_rows("vgg19", [[20.93, 4.77, 2.76], [253.68, 51.86, 28.59], [501.68, 102.33, 56.32]]),
)
ANCHOR_RESOLUTION = 224
GPUS: dict[str, tuple[Anchor, ...]] = {"v100": V100_ANCHORS}

# Fitted constants: (name, lower bound, upper bound, starting value, meaning). Bounds keep the fit
# physical (e.g. no launch cost under 3 µs, a bandwidth a real HBM2 part could have).
PARAMS: tuple[tuple[str, float, float, float, str], ...] = (
    ("t0_ms", 0.02, 2.0, 0.09, "fixed per-inference overhead (ms)"),
    ("launch_ms", 0.003, 0.05, 0.005, "per compute layer: launch and tail (ms)"),
    ("peak_gflop_per_ms", 5.0, 300.0, 31.0, "whole-GPU throughput on large layers (GFLOP/ms = TFLOP/s)"),
    ("fill_gflop", 1e-3, 50.0, 0.7, "work per layer (GFLOP, whole batch) that fills the whole GPU"),
    ("fill_sharpness", 1.0, 8.0, 1.4, "p of the soft minimum between share and fill"),
    ("mem_gb_per_ms", 0.1, 2.0, 0.79, "DRAM bandwidth (GB/ms = TB/s)"),
    ("mem_share", 0.2, 1.0, 0.77, "share beyond which DRAM bandwidth no longer grows"),
    ("size_exponent", 1e-3, 1.0, 0.24, "γ: efficiency ∝ (GFLOP per layer / 2)^γ, capped at 1"),
)
PARAM_NAMES = tuple(p[0] for p in PARAMS)
SIZE_REF_GFLOP = 2.0
MEM_SHARPNESS = 8.0


@dataclass(frozen=True)
class MpsFit:
    gpu: str
    constants: dict[str, float]
    anchors: tuple[Anchor, ...]
    predicted_ms: tuple[float, ...]

    @property
    def rel_errors(self) -> tuple[float, ...]:
        return tuple(p / a.ms - 1.0 for p, a in zip(self.predicted_ms, self.anchors, strict=True))

    @property
    def max_abs_error(self) -> float:
        return max(abs(e) for e in self.rel_errors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu, "anchor_resolution": ANCHOR_RESOLUTION,
            "constants": {k: _sig(v, 6) for k, v in self.constants.items()},
            "fixed": {"size_ref_gflop": SIZE_REF_GFLOP, "mem_sharpness": MEM_SHARPNESS},
            "anchors": [{"model": a.model, "batch": a.batch, "share": a.share, "measured_ms": a.ms,
                         "estimated_ms": _sig(p, 4), "rel_error": round(e, 4)}
                        for a, p, e in zip(self.anchors, self.predicted_ms, self.rel_errors, strict=True)],
            "max_abs_rel_error": round(self.max_abs_error, 4),
        }


# ------------------------------------------------------------------------------------ features


@dataclass(frozen=True)
class BlockFeatures:
    name: str
    flops: int
    out_bytes: int
    layers: int  # convolutions + linears
    weight_bytes: int
    act_bytes: int  # input + output bytes of its convolutions and linears, per request


@dataclass(frozen=True)
class ModelFeatures:
    name: str
    resolution: int
    input_shape: tuple[int, ...]
    input_bytes: int
    blocks: tuple[BlockFeatures, ...] = field(repr=False)

    def column(self, attr: str) -> Floats:
        return np.array([getattr(b, attr) for b in self.blocks], dtype=np.float64)

    @property
    def gflop(self) -> float:
        return float(self.column("flops").sum()) / 1e9

    @property
    def layers(self) -> int:
        return int(self.column("layers").sum())


def _compute_layers(block: nn.Module) -> Iterator[nn.Module]:
    return (m for m in block.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@functools.lru_cache(maxsize=32)
def model_features(name: str, resolution: int | None = None) -> ModelFeatures:
    """Per-block FLOPs (from ``describe``) plus layer count, weights and activation traffic.

    The blocks are built and run on the meta device: shapes only, no weights allocated.
    """
    info = describe(name, resolution)
    blocks = split_model(name, torchvision_reference(name, meta=True))
    traffic: dict[int, int] = {}

    def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        traffic[id(mod)] = (inputs[0].numel() + out.numel()) * 4

    hooks = [m.register_forward_hook(record) for b in blocks for m in _compute_layers(b)]
    x = torch.empty((1, *info.input_shape), device="meta")
    with torch.inference_mode():
        for block in blocks:
            x = block(x)
    for h in hooks:
        h.remove()
    feats = []
    for bi, block in zip(info.blocks, blocks, strict=True):
        layers = list(_compute_layers(block))
        feats.append(BlockFeatures(
            name=bi.name, flops=bi.flops, out_bytes=bi.out_bytes, layers=len(layers),
            weight_bytes=sum(p.numel() for p in block.parameters()) * 4,
            act_bytes=sum(traffic.get(id(m), 0) for m in layers)))
    return ModelFeatures(name, info.resolution, info.input_shape, info.input_bytes, tuple(feats))


# ------------------------------------------------------------------------------------ the model


def _softmin(x: Floats | float, y: Floats | float, p: Floats | float) -> Floats:
    return np.asarray((np.power(x, -p) + np.power(y, -p)) ** (-1.0 / p), dtype=np.float64)


def _rates(c: dict[str, float], gflop: Floats | float, layers: Floats | float, batch: Floats | float,
           share: Floats | float) -> tuple[Floats, Floats]:
    """Effective compute rate (GFLOP/ms) and DRAM rate (GB/ms) of a model at (batch, share)."""
    s = np.asarray(share, dtype=np.float64) / 100.0
    k = np.maximum(np.asarray(layers, dtype=np.float64), 1.0)
    per_layer = np.maximum(np.asarray(gflop, dtype=np.float64) / k, 1e-12)
    fill = per_layer * np.asarray(batch, dtype=np.float64) / c["fill_gflop"]
    occupied = _softmin(s, fill, c["fill_sharpness"])
    efficiency = np.minimum(1.0, (per_layer / SIZE_REF_GFLOP) ** c["size_exponent"])
    mem = _softmin(s / c["mem_share"], 1.0, MEM_SHARPNESS)
    return c["peak_gflop_per_ms"] * efficiency * occupied, c["mem_gb_per_ms"] * mem


def _latency(c: dict[str, float], gflop: Floats | float, layers: Floats | float, weight_gb: Floats | float,
             act_gb: Floats | float, batch: Floats | float, share: Floats | float) -> Floats:
    compute_rate, mem_rate = _rates(c, gflop, layers, batch, share)
    b = np.asarray(batch, dtype=np.float64)
    return np.asarray(c["t0_ms"] + np.asarray(layers) * c["launch_ms"] + np.asarray(gflop) * b / compute_rate
                      + (np.asarray(weight_gb) + np.asarray(act_gb) * b) / mem_rate, dtype=np.float64)


def estimate_model_latency_ms(flops_per_req: float, n_blocks: int, batch: float, share: int, cal: MpsFit,
                              *, layers: int | None = None, weight_bytes: float = 0.0,
                              act_bytes: float = 0.0) -> float:
    """Whole-model latency (ms) at ``batch`` and ``share`` percent.

    ``layers`` is the number of kernels launched (convolutions + linears, ``ModelFeatures.layers``);
    without it the block count stands in. Leaving ``weight_bytes``/``act_bytes`` at 0 drops the DRAM
    term and under-estimates memory-bound models.
    """
    k = float(layers if layers is not None else n_blocks)
    return float(_latency(cal.constants, flops_per_req / 1e9, k, weight_bytes / 1e9, act_bytes / 1e9,
                          batch, share))


def estimate_features_latency_ms(feats: ModelFeatures, batch: float, share: int, cal: MpsFit) -> float:
    return estimate_model_latency_ms(float(feats.column("flops").sum()), len(feats.blocks), batch, share, cal,
                                     layers=feats.layers, weight_bytes=float(feats.column("weight_bytes").sum()),
                                     act_bytes=float(feats.column("act_bytes").sum()))


def estimate_block_latencies(feats: ModelFeatures, batch: float, share: int, cal: MpsFit) -> Floats:
    """Per-block latencies (ms) whose sum is ``estimate_features_latency_ms`` at the same point."""
    c = cal.constants
    compute_rate, mem_rate = _rates(c, feats.gflop, feats.layers, batch, share)
    gflop = feats.column("flops") / 1e9
    return np.asarray(
        c["t0_ms"] / len(feats.blocks) + feats.column("layers") * c["launch_ms"] + gflop * batch / compute_rate
        + (feats.column("weight_bytes") / 1e9 + feats.column("act_bytes") / 1e9 * batch) / mem_rate,
        dtype=np.float64)


# ------------------------------------------------------------------------------------ fitting


def _from_free(x: Floats, lo: Floats, hi: Floats) -> Floats:
    """Unbounded → bounded, log-uniform between the bounds (constants span orders of magnitude)."""
    return np.asarray(lo * (hi / lo) ** (0.5 * (1.0 + np.tanh(x / 2.0))), dtype=np.float64)


def _to_free(v: Floats, lo: Floats, hi: Floats) -> Floats:
    u = np.clip(np.log(v / lo) / np.log(hi / lo), 1e-6, 1 - 1e-6)
    return np.asarray(np.log(u / (1 - u)), dtype=np.float64)


def _levenberg_marquardt(resid: Any, x: Floats, iters: int = 200) -> Floats:
    lam = 1e-2
    for _ in range(iters):
        r = resid(x)
        jac = np.empty((len(r), len(x)))
        for j in range(len(x)):
            dx = np.zeros(len(x))
            dx[j] = 1e-6
            jac[:, j] = (resid(x + dx) - r) / 1e-6
        g = jac.T @ jac
        improved = False
        while lam < 1e10:
            step = np.linalg.solve(g + lam * np.diag(np.diag(g) + 1e-12), -jac.T @ r)
            r2 = resid(x + step)
            if np.all(np.isfinite(r2)) and r2 @ r2 < r @ r:
                x, lam, improved = x + step, lam * 0.3, True
                break
            lam *= 10
        if not improved or float(r @ r - r2 @ r2) < 1e-14:
            break
    return x


def fit_calibration(gpu: str = "v100", *, anchors: Sequence[Anchor] | None = None, restarts: int = 8,
                    seed: int = 0) -> MpsFit:
    """Least-squares fit (relative error, in log space) of the global constants to the anchors."""
    if gpu not in GPUS:
        raise ValueError(f"no calibration anchors for gpu {gpu!r} (known: {', '.join(GPUS)})")
    pts = tuple(anchors if anchors is not None else GPUS[gpu])
    feats = {m: model_features(m, ANCHOR_RESOLUTION) for m in {a.model for a in pts}}

    def col(f: Any) -> Floats:
        return np.array([f(feats[a.model]) for a in pts], dtype=np.float64)

    gflop, layers = col(lambda f: f.gflop), col(lambda f: f.layers)
    weight_gb = col(lambda f: f.column("weight_bytes").sum() / 1e9)
    act_gb = col(lambda f: f.column("act_bytes").sum() / 1e9)
    batch = np.array([a.batch for a in pts], dtype=np.float64)
    share = np.array([a.share for a in pts], dtype=np.float64)
    measured = np.array([a.ms for a in pts])
    lo, hi = np.array([p[1] for p in PARAMS]), np.array([p[2] for p in PARAMS])

    def consts(x: Floats) -> dict[str, float]:
        return dict(zip(PARAM_NAMES, (float(v) for v in _from_free(x, lo, hi)), strict=True))

    def resid(x: Floats) -> Floats:
        with np.errstate(all="ignore"):
            pred = _latency(consts(x), gflop, layers, weight_gb, act_gb, batch, share)
            return np.asarray(np.log(pred / measured), dtype=np.float64)

    rng = np.random.default_rng(seed)
    x0 = _to_free(np.array([p[3] for p in PARAMS]), lo, hi)
    best: tuple[float, Floats] | None = None
    for i in range(max(1, restarts)):
        x = _levenberg_marquardt(resid, x0 + (rng.normal(0.0, 1.5, len(x0)) if i else 0.0))
        r = resid(x)
        if np.all(np.isfinite(r)) and (best is None or float(r @ r) < best[0]):
            best = (float(r @ r), x)
    if best is None:
        raise RuntimeError("calibration did not converge from any start")
    c = consts(best[1])
    pred = _latency(c, gflop, layers, weight_gb, act_gb, batch, share)
    return MpsFit(gpu, c, pts, tuple(float(p) for p in pred))


@functools.lru_cache(maxsize=4)
def default_calibration(gpu: str = "v100") -> MpsFit:
    return fit_calibration(gpu)


# ------------------------------------------------------------------------------------ profiles


def _sig(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


def estimate_profile(models: Sequence[str] = MODEL_NAMES, *, gpu: str = "v100", resolution: int | None = None,
                     batches: Sequence[int] = BATCHES, shares: Sequence[int] = SHARES,
                     cal: MpsFit | None = None) -> Profile:
    """An estimated profile (design.md section 3) of ``models`` on ``gpu``.

    ``resolution=None`` uses each model's default (inception_v3: 299), the inputs Graft serves by default.
    """
    cal = cal or default_calibration(gpu)
    out: dict[str, Any] = {}
    resolutions: dict[str, int] = {}
    for name in models:
        feats = model_features(name, resolution)
        resolutions[name] = feats.resolution
        grid = np.array([[estimate_block_latencies(feats, b, g, cal) for g in shares] for b in batches])
        out[name] = {
            "input_shape": list(feats.input_shape), "input_bytes": feats.input_bytes,
            "blocks": [{"name": bf.name, "out_bytes": bf.out_bytes, "flops": bf.flops,
                        "latency_ms": [[_sig(v) for v in row] for row in grid[:, :, j]]}
                       for j, bf in enumerate(feats.blocks)],
        }
    return make_profile(
        "estimated", f"{gpu} (estimated)", "gpu_share_pct", batches, shares, out,
        note=("Analytic MPS latency model calibrated to published whole-model measurements "
              "(iGniter, V100); not measured on any machine of ours. See common/estimate.py."),
        resolutions=resolutions, calibration=cal.to_dict(),
    )

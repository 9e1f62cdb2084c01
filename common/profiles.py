"""Profiles: the planner's only knowledge of speed (design.md section 3).

A profile maps (model, block j, batch b, share g) to a latency in ms. Between grid batch sizes the
latency is linear in b; below the smallest grid batch it equals the smallest batch's value; above the
largest it extrapolates the last segment. Shares are only used at grid values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SOURCES = ("measured", "estimated")
UNITS = ("gpu_share_pct", "cpu_threads")


class ProfileError(ValueError):
    """A profile file is malformed or is asked for something it does not hold."""


@dataclass(frozen=True)
class BlockProfile:
    name: str
    out_bytes: int
    flops: int
    latency_ms: tuple[tuple[float, ...], ...]  # [batch index][share index]


@dataclass(frozen=True)
class ModelProfile:
    name: str
    input_shape: tuple[int, ...]
    input_bytes: int
    blocks: tuple[BlockProfile, ...]
    batches: tuple[int, ...]
    shares: tuple[int, ...]
    # table[j, i, k]: block j, batch index i, share index k (ms)
    table: npt.NDArray[np.float64] = field(repr=False, compare=False)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def cuts(self) -> range:
        """Valid cuts: 0..N-1 (the server always runs at least the last block)."""
        return range(self.n_blocks)

    def upload_bytes(self, cut: int) -> int:
        self.check_cut(cut)
        return self.input_bytes if cut == 0 else self.blocks[cut - 1].out_bytes

    def check_cut(self, cut: int) -> None:
        if not 0 <= cut < self.n_blocks:
            raise ProfileError(f"cut {cut} is not valid for {self.name} (0..{self.n_blocks - 1})")

    def share_index(self, share: int) -> int:
        try:
            return self.shares.index(int(share))
        except ValueError:
            raise ProfileError(f"share {share} is not on the profile grid {list(self.shares)}") from None

    def batch_weights(self, b: float) -> tuple[int, int, float]:
        """Interpolation of batch b on the grid: latency = (1-w)·row[i0] + w·row[i1]."""
        bs = self.batches
        if len(bs) == 1 or b <= bs[0]:
            return 0, 0, 0.0
        if b >= bs[-1]:
            i0, i1 = len(bs) - 2, len(bs) - 1
        else:
            i1 = int(np.searchsorted(bs, b, side="right"))
            i0 = i1 - 1
        return i0, i1, (b - bs[i0]) / (bs[i1] - bs[i0])

    def block_latency(self, j: int, b: float, share: int) -> float:
        """l_j(b, g) in ms."""
        k = self.share_index(share)
        i0, i1, w = self.batch_weights(b)
        t = self.table
        return float((1.0 - w) * t[j, i0, k] + w * t[j, i1, k])

    def realigned_latency(self, counts: Mapping[int, float], share: int) -> float:
        """L(batch, g) of design.md section 2: requests join at their cut, every later block runs them all.

        ``counts`` maps cut -> number of requests (fractional allowed, as in the expected composition).
        """
        if not counts:
            return 0.0
        k = self.share_index(share)
        n = self.n_blocks
        add = np.zeros(n)
        for c, cnt in counts.items():
            self.check_cut(c)
            add[c] += cnt
        b = np.cumsum(add)
        first = min(c for c, cnt in counts.items() if cnt > 0) if any(v > 0 for v in counts.values()) else n
        return float(self.latency_for_batches(b[first:], first, k))

    def latency_for_batches(self, b: npt.NDArray[np.float64], first: int, k: int) -> float:
        """Σ_j l_j(b_j) for blocks first..N-1 with batch sizes ``b`` (vectorised interpolation)."""
        bs = np.asarray(self.batches, dtype=np.float64)
        rows = self.table[first:, :, k]  # (m, n_batches)
        if len(bs) == 1:
            return float((rows[:, 0] * below_one(b)).sum())
        bc = np.maximum(b, bs[0])
        i1 = np.clip(np.searchsorted(bs, bc, side="right"), 1, len(bs) - 1)
        i0 = i1 - 1
        w = (bc - bs[i0]) / (bs[i1] - bs[i0])
        idx = np.arange(len(b))
        return float((((1.0 - w) * rows[idx, i0] + w * rows[idx, i1]) * below_one(b)).sum())

    def suffix_latency(self, cut: int, b: float, share: int) -> float:
        """Latency of running blocks cut..N-1 on a uniform batch of b requests."""
        return self.realigned_latency({cut: b}, share)

    def scaled(self, factor: float) -> ModelProfile:
        """A copy whose every latency is multiplied by ``factor`` (> 0); ``self`` is left as it is."""
        if not math.isfinite(factor) or factor <= 0:
            raise ProfileError(f"latency factor for {self.name} must be positive and finite, got {factor!r}")
        blocks = tuple(replace(b, latency_ms=tuple(tuple(x * factor for x in row) for row in b.latency_ms))
                       for b in self.blocks)
        return replace(self, blocks=blocks, table=self.table * factor)


def below_one(b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Weight of a block whose *expected* batch ``b`` is below one request: ``b``.

    An expected composition is fractional (``n_c = B·Λ_c/Λ``): a block that sees 0.1 requests per
    batch on average runs in about one batch in ten, so it costs a tenth of its batch-1 latency — not
    all of it, which would cost every batch as if it ran the whole model from a rarely used cut.
    Batches of one request or more are unaffected.
    """
    out: npt.NDArray[np.float64] = np.minimum(np.asarray(b, dtype=np.float64), 1.0)
    return out


@dataclass(frozen=True)
class Profile:
    source: str
    device: str
    unit: str
    batches: tuple[int, ...]
    shares: tuple[int, ...]
    models: dict[str, ModelProfile]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_batch(self) -> int:
        return self.batches[-1]

    def model(self, name: str) -> ModelProfile:
        try:
            return self.models[name]
        except KeyError:
            raise ProfileError(f"model {name!r} is not in this profile ({sorted(self.models)})") from None

    def scaled(self, factors: Mapping[str, float]) -> Profile:
        """A new profile whose latencies of each model in ``factors`` are multiplied by its factor.

        Other models are shared with ``self`` (they are immutable); nothing of ``self`` is modified.
        """
        models = dict(self.models)
        for name, f in factors.items():
            models[name] = self.model(name).scaled(float(f))
        return replace(self, models=models, meta=dict(self.meta))

    # ------------------------------------------------------------------------------------------ I/O

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        try:
            source, unit = d["source"], d["unit"]
            batches = tuple(int(b) for b in d["batches"])
            shares = tuple(int(s) for s in d["shares"])
            models_in = d["models"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"profile is missing or has a bad top-level field: {exc}") from None
        if source not in SOURCES:
            raise ProfileError(f"profile source must be one of {SOURCES}, got {source!r}")
        if unit not in UNITS:
            raise ProfileError(f"profile unit must be one of {UNITS}, got {unit!r}")
        if not batches or list(batches) != sorted(set(batches)) or batches[0] < 1:
            raise ProfileError("profile batches must be increasing positive integers")
        if not shares or list(shares) != sorted(set(shares)) or shares[0] < 1:
            raise ProfileError("profile shares must be increasing positive integers")
        models: dict[str, ModelProfile] = {}
        for name, m in dict(models_in).items():
            blocks = []
            for bd in m["blocks"]:
                lat = tuple(tuple(float(x) for x in row) for row in bd["latency_ms"])
                if len(lat) != len(batches) or any(len(row) != len(shares) for row in lat):
                    raise ProfileError(f"{name}/{bd.get('name')}: latency_ms must be batches × shares")
                blocks.append(BlockProfile(str(bd["name"]), int(bd["out_bytes"]), int(bd.get("flops", 0)), lat))
            if not blocks:
                raise ProfileError(f"model {name!r} has no blocks")
            table = np.array([b.latency_ms for b in blocks], dtype=np.float64)
            if not np.all(np.isfinite(table)) or np.any(table < 0):
                raise ProfileError(f"model {name!r} has negative or non-finite latencies")
            models[name] = ModelProfile(
                name=name, input_shape=tuple(int(x) for x in m["input_shape"]),
                input_bytes=int(m["input_bytes"]), blocks=tuple(blocks), batches=batches, shares=shares,
                table=table,
            )
        meta = {k: v for k, v in d.items() if k not in ("source", "unit", "batches", "shares", "models", "device")}
        return cls(source=source, device=str(d.get("device", "")), unit=unit, batches=batches,
                   shares=shares, models=models, meta=meta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "device": self.device, "unit": self.unit,
            "batches": list(self.batches), "shares": list(self.shares), **self.meta,
            "models": {
                name: {
                    "input_shape": list(m.input_shape), "input_bytes": m.input_bytes,
                    "blocks": [{"name": b.name, "out_bytes": b.out_bytes, "flops": b.flops,
                                "latency_ms": [list(r) for r in b.latency_ms]} for b in m.blocks],
                }
                for name, m in self.models.items()
            },
        }

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfileError(f"cannot read profile {p}: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def merged(self, other: Profile) -> Profile:
        """Union of models of two profiles on the same grid (other wins on conflicts)."""
        if (self.batches, self.shares, self.unit) != (other.batches, other.shares, other.unit):
            raise ProfileError("profiles on different grids cannot be merged")
        return Profile(self.source, self.device, self.unit, self.batches, self.shares,
                       {**self.models, **other.models}, {**self.meta, **other.meta})


def make_profile(source: str, device: str, unit: str, batches: Sequence[int], shares: Sequence[int],
                 models: Mapping[str, Mapping[str, Any]], **meta: Any) -> Profile:
    """Build a Profile from plain data (the JSON shape), validating it."""
    return Profile.from_dict({"source": source, "device": device, "unit": unit, "batches": list(batches),
                              "shares": list(shares), "models": dict(models), **meta})


DATA_DIR = Path(__file__).parent / "data"


def shipped(name: str) -> Path:
    """Path of a profile shipped with the package (``common/data/<name>.json``)."""
    return DATA_DIR / f"{name}.json"

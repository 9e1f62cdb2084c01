"""A model's tensor shapes per cut, without torch: what the front door checks requests against.

The planner describes each served model once (``common.model.zoo.describe``, which needs torch) and
publishes the shapes in the plan (``plan["shapes"]``)::

    "shapes": {"resnet18": {"resolution": 224, "cuts": [[3, 224, 224], [64, 112, 112], ...],
                            "output": [1000]}}

``cuts[c]`` is the per-request shape the server receives at cut ``c`` (the device ran blocks
``0..c-1``). The ingress and the gateway take them from there, so they start without importing torch
(two seconds on an idle core, tens under load: the time an ingress restart leaves requests waiting)
and fall back to describing a model themselves only when a plan lacks its shapes or was made at
another resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from common.contract.errors import BadCut

# A model's resolution when GRAFT_RESOLUTION leaves it unset (224 unless listed).
DEFAULT_RESOLUTION: dict[str, int] = {"inception_v3": 299}


def served_resolution(name: str, resolution: int | None) -> int:
    """The resolution ``name`` is served at: the setting, else the model's default."""
    return int(resolution) if resolution else DEFAULT_RESOLUTION.get(name, 224)


class Described(Protocol):
    """What ``common.model.zoo.ModelInfo`` offers (kept structural so this module needs no torch)."""

    @property
    def name(self) -> str: ...

    @property
    def resolution(self) -> int: ...

    @property
    def cuts(self) -> range: ...

    def cut_shape(self, cut: int) -> tuple[int, ...]: ...

    @property
    def output_shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True, slots=True)
class ModelShapes:
    name: str
    resolution: int
    cuts: tuple[tuple[int, ...], ...]  # indexed by cut
    output: tuple[int, ...]

    @property
    def n_blocks(self) -> int:
        return len(self.cuts)

    def cut_shape(self, cut: int) -> tuple[int, ...]:
        if not 0 <= cut < len(self.cuts):
            raise BadCut(f"cut {cut} is not valid for {self.name} (0..{len(self.cuts) - 1})", model=self.name, cut=cut)
        return self.cuts[cut]

    @classmethod
    def of(cls, info: Described) -> ModelShapes:
        return cls(info.name, int(info.resolution), tuple(tuple(info.cut_shape(c)) for c in info.cuts),
                   tuple(info.output_shape))

    def to_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "cuts": [list(s) for s in self.cuts], "output": list(self.output)}

    @classmethod
    def from_dict(cls, name: str, d: Any) -> ModelShapes | None:
        """The shapes of one ``plan["shapes"]`` entry; None when it is not well formed."""
        if not isinstance(d, Mapping):
            return None
        res, cuts, out = d.get("resolution"), d.get("cuts"), d.get("output")
        if not (isinstance(res, int) and res > 0 and isinstance(cuts, list) and cuts and isinstance(out, list)):
            return None
        if not all(_dims(s) for s in cuts) or not _dims(out):
            return None
        return cls(name, res, tuple(tuple(s) for s in cuts), tuple(out))


def _dims(s: Any) -> bool:
    return isinstance(s, list) and bool(s) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in s)


def plan_shapes(plan: Mapping[str, Any]) -> dict[str, ModelShapes]:
    """``{model: ModelShapes}`` from a plan document's ``shapes`` (malformed entries left out)."""
    raw = plan.get("shapes")
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, ModelShapes] = {}
    for name, d in raw.items():
        shapes = ModelShapes.from_dict(str(name), d)
        if shapes is not None:
            out[str(name)] = shapes
    return out


class ShapeBook:
    """The shapes of models at one served resolution, learnt once each: from a plan's published shapes
    when made at that resolution, else by describing the model (``common.model.zoo.describe`` by default,
    imported on first use: it needs torch; slow, so callers run ``learn`` in a thread)."""

    def __init__(self, resolution: int | None, describe_fn: Callable[[str, int | None], Described] | None = None) -> None:
        self.resolution = resolution or None
        self._describe = describe_fn
        self._known: dict[str, ModelShapes] = {}

    def learn(self, models: Iterable[str], published: Mapping[str, ModelShapes] | None = None) -> list[str]:
        """Learn the models not known yet; returns their names."""
        new = sorted(set(models) - self._known.keys())
        for name in new:
            shapes = (published or {}).get(name)
            if shapes is None or shapes.resolution != served_resolution(name, self.resolution):
                shapes = ModelShapes.of(self._describer()(name, self.resolution))
            self._known[name] = shapes
        return new

    def _describer(self) -> Callable[[str, int | None], Described]:
        if self._describe is None:
            from common.model.zoo import describe  # torch: only for a plan without shapes

            self._describe = describe
            return describe
        return self._describe

    def __getitem__(self, model: str) -> ModelShapes:
        return self._known[model]

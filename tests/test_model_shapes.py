"""The shapes a plan carries (``plan["shapes"]``): what lets the ingress and gateway start without torch."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from common.contract.errors import BadCut, UnknownModel
from common.model.shapes import ModelShapes, ShapeBook, plan_shapes, served_resolution
from common.model.zoo import default_resolution, describe
from common.settings import Settings
from services.gateway.catalog import Catalog
from services.ingress.validate import ModelCatalog
from services.planner.service import Planner
from tests.helpers import cpu_test_profile

RES = 32


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2", "densenet121"])
def test_published_shapes_are_the_described_ones(model: str) -> None:
    info = describe(model, RES)
    shapes = ModelShapes.from_dict(model, ModelShapes.of(info).to_dict())
    assert shapes is not None and shapes.resolution == RES and shapes.n_blocks == info.n_blocks
    assert [shapes.cut_shape(c) for c in info.cuts] == [info.cut_shape(c) for c in info.cuts]
    assert shapes.output == info.output_shape
    for bad in (-1, info.n_blocks):
        with pytest.raises(BadCut) as exc:
            shapes.cut_shape(bad)
        with pytest.raises(BadCut) as want:
            info.cut_shape(bad)
        assert exc.value.message == want.value.message


def test_default_resolution_is_one_rule() -> None:
    for model in ("resnet18", "inception_v3"):
        assert served_resolution(model, None) == default_resolution(model)
        assert served_resolution(model, 64) == 64


def test_malformed_entries_are_left_out() -> None:
    good = ModelShapes.of(describe("resnet18", RES)).to_dict()
    plan: dict[str, Any] = {"shapes": {
        "resnet18": good, "a": None, "b": {"resolution": 0, "cuts": [[1]], "output": [1]},
        "c": {"resolution": 8, "cuts": [], "output": [1]}, "d": {"resolution": 8, "cuts": [[1, -2]], "output": [1]},
        "e": {"resolution": 8, "cuts": [[1, True]], "output": [1]}, "f": {"resolution": 8, "cuts": [[1]], "output": "x"},
        "g": {"resolution": 8, "cuts": "nope", "output": [1]}}}
    assert list(plan_shapes(plan)) == ["resnet18"]
    assert plan_shapes({}) == {} and plan_shapes({"shapes": [1, 2]}) == {}


def refusing(name: str, resolution: int | None) -> Any:
    raise AssertionError(f"described {name} although the plan carries its shapes")


def test_front_door_catalogs_use_the_plan_shapes_and_describe_only_what_is_missing() -> None:
    published = plan_shapes({"shapes": {"resnet18": ModelShapes.of(describe("resnet18", RES)).to_dict()}})
    ingress = ModelCatalog(RES, refusing)
    ingress.serve(["resnet18"], published)
    assert ingress.cut_shape("resnet18", 0) == (3, RES, RES)
    with pytest.raises(UnknownModel):
        ingress.cut_shape("mobilenet_v2", 0)
    gateway = Catalog(RES, refusing)
    gateway.prepare(["resnet18"], published)

    calls: list[tuple[str, int | None]] = []

    def counting(name: str, resolution: int | None) -> Any:
        calls.append((name, resolution))
        return describe(name, resolution)

    other = ModelCatalog(64, counting)  # the plan was made at 32: its shapes do not apply at 64
    other.serve(["resnet18", "mobilenet_v2"], published)
    other.serve(["resnet18", "mobilenet_v2"], published)
    assert calls == [("mobilenet_v2", 64), ("resnet18", 64)]
    assert other.cut_shape("resnet18", 0) == (3, 64, 64)


async def test_the_planner_publishes_each_served_models_shapes(redis) -> None:
    planner = Planner(Settings(models=("m",), resolution=RES), redis, cpu_test_profile(), "p")
    shapes = await planner.published_shapes({"groups": [{"model": "resnet18"}, {"model": "resnet18"}]})
    assert list(shapes) == ["resnet18"]
    assert shapes["resnet18"] == ModelShapes.of(describe("resnet18", RES)).to_dict()
    # A model the zoo does not know (a test profile's) is published without shapes, not a crash.
    assert await planner.published_shapes({"groups": [{"model": "m"}]}) == {}


def test_front_door_services_import_without_torch() -> None:
    code = ("import sys, services.ingress.__main__, services.gateway.server; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "torch was imported by the ingress or the gateway"


def test_shape_book_learns_once() -> None:
    calls: list[str] = []

    def counting(name: str, resolution: int | None) -> Any:
        calls.append(name)
        return describe(name, resolution)

    book = ShapeBook(RES, counting)
    assert book.learn(["resnet18"]) == ["resnet18"] and book.learn(["resnet18"]) == []
    assert calls == ["resnet18"] and book["resnet18"].cut_shape(0) == (3, RES, RES)

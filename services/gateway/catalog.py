"""What the gateway serves: the current plan's models, each with one input per cut, at the served resolution.

A model's *signature* lists the inputs ``cut_0 .. cut_{N-1}`` (datatype FP32, shape ``[-1, *cut_shape]``:
the tensor the device holds after blocks ``0..c-1``, per request, at ``GRAFT_RESOLUTION``) and its one
output ``logits`` (``[-1, *out_shape]``). Signatures come from the shapes the planner publishes in the
plan (``common.model.shapes``: no torch in the gateway), else from ``common.model.zoo.describe`` (shapes
on the meta device, no weights; imported on first use), once per model and cached; the served set
follows the plan (``PlanFollower`` polls ``graft:{plan}`` like the ingress does, and prepares new models
in a thread so the event loop never stalls on it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common import logs
from common.contract.routing import PlanView
from common.model.shapes import Described, ModelShapes, ShapeBook, plan_shapes
from common.store.connection import TRANSIENT, Client
from common.store.plan_store import PlanWatcher
from services.gateway.mapping import OUTPUT_NAME, input_name

log = logs.get_logger("graft.gateway")

Describe = Callable[[str, int | None], Described]


@dataclass(frozen=True, slots=True)
class CutInput:
    name: str
    cut: int
    shape: tuple[int, ...]  # per request, without the batch dimension


@dataclass(frozen=True, slots=True)
class Signature:
    """One served model in the protocol's terms."""

    model: str
    resolution: int
    inputs: tuple[CutInput, ...]  # indexed by cut
    output_shape: tuple[int, ...]

    @property
    def n_blocks(self) -> int:
        return len(self.inputs)

    def input(self, name: str, cut: int | None) -> CutInput | None:
        if cut is None or not 0 <= cut < len(self.inputs) or self.inputs[cut].name != name:
            return None
        return self.inputs[cut]

    def metadata(self) -> dict[str, Any]:
        """The OIP model metadata object (``GET /v2/models/{m}``; gRPC ``ModelMetadata`` has the same fields)."""
        return {"name": self.model, "versions": ["1"], "platform": "graft",
                "inputs": [{"name": i.name, "datatype": "FP32", "shape": [-1, *i.shape]} for i in self.inputs],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, *self.output_shape]}]}


def signature_of(shapes: ModelShapes) -> Signature:
    inputs = tuple(CutInput(input_name(c), c, s) for c, s in enumerate(shapes.cuts))
    return Signature(shapes.name, shapes.resolution, inputs, shapes.output)


class Catalog:
    """The served models' signatures; ``epoch`` is None until a plan was seen."""

    def __init__(self, resolution: int | None, describe_fn: Describe | None = None) -> None:
        self.book = ShapeBook(resolution, describe_fn)
        self._known: dict[str, Signature] = {}
        self._served: dict[str, Signature] = {}
        self.epoch: int | None = None

    def prepare(self, models: Iterable[str], published: Mapping[str, ModelShapes] | None = None) -> None:
        """Learn the signatures of the models not seen yet (from the plan's shapes, else described: slow,
        run it in a thread)."""
        for name in self.book.learn(models, published):
            self._known[name] = signature_of(self.book[name])

    def serve(self, view: PlanView) -> None:
        """Serve exactly the plan's models (prepared first if need be)."""
        self.prepare(view.models, plan_shapes(view.raw))
        self._served = {m: self._known[m] for m in sorted(view.models)}
        self.epoch = view.epoch

    @property
    def has_plan(self) -> bool:
        return self.epoch is not None

    @property
    def models(self) -> list[str]:
        return list(self._served)

    def get(self, model: str) -> Signature | None:
        return self._served.get(model)


class PlanFollower:
    """Keeps a ``Catalog`` on the current plan: polls ``graft:{plan}`` every ``interval_s``."""

    def __init__(self, r: Client, catalog: Catalog, *, interval_s: float = 0.2,
                 on_change: Callable[[Catalog], None] | None = None) -> None:
        self.catalog = catalog
        self.watcher = PlanWatcher(r, interval=interval_s)
        self.interval_s = interval_s
        self.on_change = on_change

    async def poll(self) -> bool:
        """One poll; True when the catalog moved to a newer plan."""
        view = await self.watcher.poll()
        if view is None:
            return False
        await asyncio.to_thread(self.catalog.prepare, view.models, plan_shapes(view.raw))
        self.catalog.serve(view)
        log.info(logs.Event.PLAN_SWITCHED, service="gateway", epoch=view.epoch, models=self.catalog.models)
        if self.on_change is not None:
            self.on_change(self.catalog)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll()
            except TRANSIENT as exc:  # Redis away: keep serving the plan we have
                log.warning(logs.Event.REDIS_RECONNECT, service="gateway", error=repr(exc))
            except Exception as exc:  # a plan we cannot read (or a model we cannot describe): keep the last one
                log.error(logs.Event.MALFORMED, service="gateway", key="graft:{plan}", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

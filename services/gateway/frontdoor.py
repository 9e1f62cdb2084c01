"""The protocol-neutral core of the gateway: discovery and inference, shared by HTTP and gRPC.

A front end parses its wire format into an ``InferCall`` and hands it to ``FrontDoor.infer``, which
checks it against the model's signature, splits the batch into rows, submits every row to Graft as
one request (concurrently, through the gateway's single ``GraftClient``) and answers with the stacked
rows or the first failed row's ``GatewayError``. Waiting is bounded by the request's budget plus
``wait_margin_s`` (and by the client's own deadline); a front end that cancels the call (a client that
went away, a deadline that passed) cancels every row's wait, and the SDK forgets their futures, so
nothing is left pending: a late reply is dropped by the SDK's reader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from common.client import ClientClosed, GraftClient
from common.contract import wire
from common.contract.errors import GraftError
from common.metrics import GATEWAY_IN_FLIGHT, GATEWAY_LATENCY_MS, GATEWAY_REQUESTS
from common.settings import Settings
from common.store.connection import TRANSIENT
from services.gateway.catalog import Catalog, Signature
from services.gateway.mapping import (
    NOT_FOUND,
    TIMEOUT,
    UNAVAILABLE,
    Answer,
    Budget,
    GatewayError,
    answer,
    budget_of,
    check_datatype,
    check_outputs,
    check_shape,
    cut_of,
    invalid,
    tensor_from_bytes,
    tensor_from_list,
)

SERVER_NAME = "graft"
EXTENSIONS = ("binary_tensor_data", "parameters", "schedule_policy")
# The gateway waits for replies up to the budget plus this: a worker answers DEADLINE_EXCEEDED itself
# when it cannot make the deadline, so only a stalled or unreachable system runs into this margin.
WAIT_MARGIN_S = 1.0
MAX_ROWS = 1024  # rows (Graft requests) in one inference request


def _version() -> str:
    try:
        return metadata.version("graft-serve")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass(slots=True)
class InputTensor:
    """One input as the client sent it: raw little-endian bytes (binary/gRPC) or JSON numbers."""

    name: str
    datatype: Any
    shape: Any
    raw: bytes | bytearray | memoryview | None = None
    values: Any = None


@dataclass(slots=True)
class InferCall:
    model: str
    version: str
    inputs: Sequence[InputTensor]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    outputs: Sequence[str] = ()
    deadline_s: float | None = None  # seconds the client still waits (gRPC deadline), None: no deadline


class ProtocolMeters:
    """The metric children of one protocol, looked up once (``labels()`` costs microseconds per call)."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.in_flight = GATEWAY_IN_FLIGHT.labels(protocol=protocol)
        self.latency = GATEWAY_LATENCY_MS.labels(protocol=protocol)
        self._outcomes: dict[str, Any] = {}

    def outcome(self, outcome: str) -> Any:
        c = self._outcomes.get(outcome)
        if c is None:
            c = self._outcomes[outcome] = GATEWAY_REQUESTS.labels(protocol=self.protocol, outcome=outcome)
        return c


class Tracked:
    """``with door.tracked(protocol):`` — one request in flight; its outcome (``ok``, the ``GatewayError``'s
    code, ``CANCELLED`` when the client went away, ``INTERNAL`` for anything else) and latency counted."""

    __slots__ = ("_meters", "_started")

    def __init__(self, meters: ProtocolMeters) -> None:
        self._meters = meters
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()
        self._meters.in_flight.inc()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        m = self._meters
        m.in_flight.dec()
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, GatewayError):
            outcome = exc.code
        elif isinstance(exc, asyncio.CancelledError):
            outcome = "CANCELLED"
        else:
            outcome = "INTERNAL"
        m.outcome(outcome).inc()
        m.latency.observe((time.perf_counter() - self._started) * 1000.0)


class FrontDoor:
    def __init__(self, client: GraftClient, catalog: Catalog, settings: Settings, *,
                 wait_margin_s: float = WAIT_MARGIN_S) -> None:
        self.client = client
        self.catalog = catalog
        self.settings = settings
        self.wait_margin_s = wait_margin_s
        self.version = _version()
        self._meters: dict[str, ProtocolMeters] = {}

    # ---------------------------------------------------------------------------------- discovery

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.version, "extensions": list(EXTENSIONS)}

    @property
    def ready(self) -> bool:
        """Ready when a published plan serves at least one model."""
        return self.catalog.has_plan and bool(self.catalog.models)

    def signature(self, model: str, version: str = "") -> Signature:
        if not self.catalog.has_plan:
            raise GatewayError(UNAVAILABLE, "no plan is published yet: Graft is starting")
        sig = self.catalog.get(model)
        if sig is None:
            served = ", ".join(self.catalog.models) or "none"
            raise GatewayError(NOT_FOUND, f"model {model!r} is not served by plan epoch {self.catalog.epoch} "
                                          f"(served: {served})", {"model": model})
        if version not in ("", "1"):
            raise GatewayError(NOT_FOUND, f"model {model!r} has no version {version!r} (only 1)", {"model": model})
        return sig

    def model_ready(self, model: str, version: str = "") -> bool:
        try:
            self.signature(model, version)
        except GatewayError:
            return False
        return True

    # ---------------------------------------------------------------------------------- inference

    def tracked(self, protocol: str) -> Tracked:
        """Count one inference request of ``protocol`` (in flight, outcome, latency) around its handling."""
        meters = self._meters.get(protocol)
        if meters is None:
            meters = self._meters[protocol] = ProtocolMeters(protocol)
        return Tracked(meters)

    def tensor_of(self, sig: Signature, call: InferCall) -> tuple[int, npt.NDArray[np.float32]]:
        """The call's cut and its input as a ``[B, *cut_shape]`` float32 array."""
        if len(call.inputs) != 1:
            raise invalid(f"a request names exactly one input, the cut it uploads (cut_0 .. cut_{sig.n_blocks - 1}); "
                          f"got {len(call.inputs)}")
        inp = call.inputs[0]
        cut_input = sig.input(str(inp.name), cut_of(str(inp.name)))
        if cut_input is None:
            raise invalid(f"unknown input {inp.name!r} of {sig.model}: inputs are cut_0 .. cut_{sig.n_blocks - 1} "
                          f"(see GET /v2/models/{sig.model})", input=str(inp.name))
        check_datatype(cut_input.name, inp.datatype)
        rows = check_shape(cut_input.name, inp.shape, cut_input.shape)
        if rows > MAX_ROWS:
            raise invalid(f"input {cut_input.name}: {rows} rows, at most {MAX_ROWS} per request")
        shape = (rows, *cut_input.shape)
        if inp.raw is not None:
            return cut_input.cut, tensor_from_bytes(cut_input.name, inp.raw, shape)
        if inp.values is None:
            raise invalid(f"input {cut_input.name} carries no data (neither 'data' nor binary data)")
        return cut_input.cut, tensor_from_list(cut_input.name, inp.values, shape)

    async def infer(self, call: InferCall) -> Answer:
        """Answer one inference request; raises ``GatewayError`` for every refusal."""
        sig = self.signature(call.model, call.version)
        cut, tensor = self.tensor_of(sig, call)
        check_outputs(call.outputs)
        budget = budget_of(call.parameters, self.settings.default_budget_ms, call.deadline_s)
        wait_s = max(0.0, budget.server_ms) / 1000.0 + self.wait_margin_s
        if call.deadline_s is not None:
            wait_s = min(wait_s, max(0.0, call.deadline_s))
        replies = await self.submit_rows(sig.model, cut, tensor, budget, wait_s)
        return answer(replies)

    async def submit_rows(self, model: str, cut: int, tensor: npt.NDArray[np.float32], budget: Budget,
                          wait_s: float) -> list[wire.Reply]:
        """Each row of ``tensor`` as one Graft request, all in flight at once; their replies in row order."""
        def one(row: npt.NDArray[np.float32]) -> Any:
            return self.client.submit_reply(model, cut, row, budget_ms=budget.budget_ms, slo_ms=budget.slo_ms,
                                            device_ms=budget.device_ms, timeout_s=wait_s)
        try:
            if len(tensor) == 1:
                return [await one(tensor[0])]
            tasks = [asyncio.ensure_future(one(row)) for row in tensor]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:  # one row failed to be sent or timed out: stop waiting for the others
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        except TimeoutError:
            raise GatewayError(TIMEOUT, f"no reply from Graft within {wait_s:.3f} s (the budget plus "
                                        f"{self.wait_margin_s:g} s): the system is stalled or overloaded") from None
        except ClientClosed:
            raise GatewayError(UNAVAILABLE, "the gateway is stopping") from None
        except GraftError as exc:  # refused before it was sent (e.g. the SDK's own size limit)
            raise GatewayError(str(exc.code), exc.message, exc.details) from None
        except TRANSIENT as exc:
            raise GatewayError(UNAVAILABLE, f"Graft is unreachable: {exc!r}") from None

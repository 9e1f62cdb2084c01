"""The Open Inference Protocol in Graft's terms, and back: pure functions, no I/O, no protocol stack.

Both front ends (HTTP and gRPC) turn what a client sent into the same few values here and turn Graft's
replies into the same answers, so the two protocols cannot drift apart:

* ``cut_of(name)``: an input name ``cut_{c}`` → the cut ``c``;
* ``budget_of(parameters, ...)``: the request's server budget from ``budget_ms``, ``timeout`` (µs),
  ``slo_ms`` + ``device_ms``, or the default;
* ``GatewayError``: every refusal, with a Graft error code (or one of the gateway's own: ``NOT_FOUND``,
  ``UNAVAILABLE``, ``TIMEOUT``), mapped by ``HTTP_STATUS`` and ``GRPC_STATUS``;
* ``answer(replies)``: the replies of a request's rows → the stacked output and the response
  parameters, or the ``GatewayError`` of the first row that failed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from common.contract import wire
from common.contract.errors import ErrorCode

INPUT_PREFIX = "cut_"
OUTPUT_NAME = "logits"
FP32 = "FP32"

# The gateway's own refusals, besides Graft's error codes.
NOT_FOUND = "NOT_FOUND"  # no such model (or version) in the current plan
UNAVAILABLE = "UNAVAILABLE"  # no plan yet, Redis unreachable, or the gateway is stopping
TIMEOUT = "TIMEOUT"  # the gateway's own wait for a reply ran out

HTTP_STATUS: dict[str, int] = {
    ErrorCode.INVALID_REQUEST: 400, ErrorCode.BAD_CUT: 400, ErrorCode.BAD_TENSOR: 400,
    ErrorCode.UNKNOWN_MODEL: 404, NOT_FOUND: 404,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504, TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
    UNAVAILABLE: 503,
}

GRPC_STATUS: dict[str, grpc.StatusCode] = {
    ErrorCode.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.BAD_CUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.BAD_TENSOR: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_MODEL: grpc.StatusCode.NOT_FOUND, NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED, TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


class GatewayError(Exception):
    """A request the gateway answers with an error; ``code`` picks the HTTP and gRPC status."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return GRPC_STATUS.get(self.code, grpc.StatusCode.INTERNAL)

    @property
    def retry_after_ms(self) -> int | None:
        """For OVERLOADED: how long Graft asks the client to wait before trying again."""
        raw = self.details.get("retry_after_ms")
        if self.code != ErrorCode.OVERLOADED or isinstance(raw, bool) or not isinstance(raw, int | float):
            return None
        return max(0, math.ceil(raw))

    @property
    def retry_after_s(self) -> int | None:
        """``Retry-After`` in whole seconds, rounded up (at least 1)."""
        ms = self.retry_after_ms
        return None if ms is None else max(1, math.ceil(ms / 1000.0))

    def text(self) -> str:
        """The message a client reads: ``CODE: message`` (and the retry hint for OVERLOADED)."""
        hint = "" if self.retry_after_ms is None else f" (retry_after_ms={self.retry_after_ms})"
        return f"{self.code}: {self.message}{hint}"

    def __repr__(self) -> str:
        return f"GatewayError({self.code}, {self.message!r})"


def invalid(message: str, **details: Any) -> GatewayError:
    return GatewayError(ErrorCode.INVALID_REQUEST, message, details)


def bad_tensor(message: str, **details: Any) -> GatewayError:
    return GatewayError(ErrorCode.BAD_TENSOR, message, details)


# --------------------------------------------------------------------------------------------- inputs


def input_name(cut: int) -> str:
    return f"{INPUT_PREFIX}{cut}"


def cut_of(name: str) -> int | None:
    """The cut an input name stands for (``cut_8`` → 8); None for any other name."""
    if not name.startswith(INPUT_PREFIX):
        return None
    digits = name[len(INPUT_PREFIX):]
    if not digits.isascii() or not digits.isdigit() or (len(digits) > 1 and digits[0] == "0"):
        return None
    return int(digits)


def check_shape(name: str, shape: Sequence[Any], expected: Sequence[int]) -> int:
    """The batch size of an input of ``shape`` whose rows must have the cut's ``expected`` shape."""
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise invalid(f"input {name}: shape must be a list of integers")
    if len(shape) != len(expected) + 1 or list(shape[1:]) != list(expected) or shape[0] < 1:
        raise bad_tensor(f"input {name}: shape {list(shape)} does not match [-1, {', '.join(map(str, expected))}] "
                         f"(a batch of at least one row of the cut's shape; see the model's metadata)",
                         expected=[-1, *expected], got=list(shape))
    return int(shape[0])


def check_datatype(name: str, datatype: Any) -> None:
    if datatype != FP32:
        raise bad_tensor(f"input {name}: datatype must be {FP32}, got {datatype!r}", expected=FP32, got=datatype)


def tensor_from_bytes(name: str, data: bytes | bytearray | memoryview, shape: Sequence[int]) -> npt.NDArray[np.float32]:
    """A float32 array of ``shape`` over raw little-endian bytes (a view: the SDK copies on encode)."""
    want = math.prod(shape) * 4
    if len(data) != want:
        raise bad_tensor(f"input {name}: {len(data)} bytes of data, shape {list(shape)} of {FP32} needs {want}",
                         expected=want, got=len(data))
    return np.frombuffer(data, dtype="<f4").reshape(tuple(shape))


def tensor_from_list(name: str, data: Any, shape: Sequence[int]) -> npt.NDArray[np.float32]:
    """A float32 array of ``shape`` from JSON ``data`` (flat or nested numbers, row-major)."""
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        raise bad_tensor(f"input {name}: data must be numbers") from None
    if arr.size != math.prod(shape):
        raise bad_tensor(f"input {name}: {arr.size} values of data, shape {list(shape)} needs {math.prod(shape)}",
                         expected=math.prod(shape), got=int(arr.size))
    return arr.reshape(tuple(shape))


def check_outputs(names: Sequence[str]) -> None:
    for name in names:
        if name != OUTPUT_NAME:
            raise invalid(f"unknown output {name!r}; this model has one output, {OUTPUT_NAME!r}")


# -------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True, slots=True)
class Budget:
    """What the Graft request carries: ``budget_ms``, or ``slo_ms`` and ``device_ms``."""

    budget_ms: float | None = None
    slo_ms: float | None = None
    device_ms: float | None = None

    @property
    def server_ms(self) -> float:
        """The server-side budget these values give (the ingress computes the same)."""
        if self.budget_ms is not None:
            return self.budget_ms
        return (self.slo_ms or 0.0) - (self.device_ms or 0.0)


def _number(parameters: Mapping[str, Any], key: str) -> float | None:
    val = parameters.get(key)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise invalid(f"parameter {key!r} must be a number, got {val!r}")
    return float(val)


def budget_of(parameters: Mapping[str, Any], default_ms: float, deadline_s: float | None = None) -> Budget:
    """The server budget a request asks for, first match wins:

    1. ``budget_ms`` (ms): Graft's server-side budget itself;
    2. ``timeout`` (µs, the schedule-policy/timeout extension; 0 means none): budget = timeout / 1000;
    3. ``slo_ms`` (and ``device_ms``, default 0): budget = slo_ms - device_ms, as the SDK computes it;
    4. none of them: ``default_ms`` — or, when the client set a deadline (gRPC), the smaller of the
       two, since a reply after the client gave up helps nobody.

    Types are checked here; ranges (> 0, at most GRAFT_MAX_SLO_MS) by the ingress, like any producer's.
    """
    budget = _number(parameters, "budget_ms")
    if budget is not None:
        return Budget(budget_ms=budget)
    timeout_us = _number(parameters, "timeout")
    if timeout_us:
        return Budget(budget_ms=timeout_us / 1000.0)
    slo = _number(parameters, "slo_ms")
    if slo is not None:
        return Budget(slo_ms=slo, device_ms=_number(parameters, "device_ms") or 0.0)
    if parameters.get("device_ms") is not None:
        raise invalid("parameter 'device_ms' needs 'slo_ms' (budget = slo_ms - device_ms)")
    if deadline_s is not None and math.isfinite(deadline_s):
        return Budget(budget_ms=max(1.0, min(default_ms, deadline_s * 1000.0)))
    return Budget(budget_ms=default_ms)


# ------------------------------------------------------------------------------------------- answers


@dataclass(slots=True)
class Answer:
    """A request's result: the stacked output rows and the response parameters."""

    output: npt.NDArray[np.float32]
    parameters: dict[str, bool | int | float | str] = field(default_factory=dict)


def error_of(reply: wire.Reply, row: int, rows: int) -> GatewayError:
    err = reply.error
    code, message, details = ((err.code, err.message, err.details) if err is not None
                              else (ErrorCode.INTERNAL, "reply without result or error", {}))
    if code not in HTTP_STATUS:  # a code this gateway does not know is a server fault
        message, code = f"{code}: {message}", ErrorCode.INTERNAL
    where = f"row {row} of {rows}: " if rows > 1 else ""
    return GatewayError(code, where + message, {**details, "row": row} if rows > 1 else details)


def _row_facts(reply: wire.Reply) -> dict[str, Any]:
    facts: dict[str, Any] = {"server_ms": round(reply.server_ms, 3), "epoch": reply.epoch, "group": reply.group,
                             "batch": reply.batch}
    if reply.timings:
        facts["timings"] = {k: round(v, 3) for k, v in reply.timings.items()}
    return facts


def response_parameters(replies: Sequence[wire.Reply]) -> dict[str, bool | int | float | str]:
    """Graft's facts about a request, as OIP response parameters (scalars only, as the protocol allows):

    ``server_ms`` (the slowest row's time on the server), ``epoch`` (the plan epoch, the newest of the
    rows'), ``group`` (the serving group; distinct groups comma-separated), ``batch`` (the largest
    batch a row ran in); for one row ``timings`` (JSON object: where its server time went), for
    several ``rows`` (JSON list of each row's ``server_ms``, ``epoch``, ``group``, ``batch``, ``timings``).
    """
    params: dict[str, bool | int | float | str] = {"server_ms": max(r.server_ms for r in replies)}
    epochs = [r.epoch for r in replies if r.epoch is not None]
    if epochs:
        params["epoch"] = max(epochs)
    groups = list(dict.fromkeys(r.group for r in replies if r.group))
    if groups:
        params["group"] = ",".join(groups)
    batches = [r.batch for r in replies if r.batch is not None]
    if batches:
        params["batch"] = max(batches)
    if len(replies) == 1:
        if replies[0].timings:
            params["timings"] = json.dumps(replies[0].timings, separators=(",", ":"))
    else:
        params["rows"] = json.dumps([_row_facts(r) for r in replies], separators=(",", ":"))
    return params


def answer(replies: Sequence[wire.Reply]) -> Answer:
    """The rows' replies (in row order) as one answer; the first failed row's error otherwise.

    A request is answered whole or not at all: when any row failed, the client gets that row's error
    (the first one in row order) and no partial output, as a batched model call would fail.
    """
    if not replies:
        raise invalid("a request needs at least one row")
    for i, rep in enumerate(replies):
        if not rep.ok or rep.tensor is None:
            raise error_of(rep, i, len(replies))
    if len(replies) == 1:
        out = np.asarray(replies[0].tensor, dtype=np.float32)[None]
    else:
        out = np.stack([np.asarray(r.tensor, dtype=np.float32) for r in replies])
    return Answer(out, response_parameters(replies))

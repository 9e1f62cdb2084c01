"""The admission rules every part applies to a request, in one place (pure: no Redis, no torch).

The ingress judges each request at the edge and the replica judges each stream entry again (a
stream may be written by hand, by an older ingress, or hold garbage): both call these functions, so
an entry one accepts is never one the other refuses.

* ids — ``req_id`` and ``client`` become parts of key names: printable, no whitespace, 1..256 chars;
* tensor — float32, of exactly the per-request shape the model produces before block ``cut``
  (no batch dimension; a leading 1 is a different shape), within the byte limit;
* budget — ``budget_ms``, else ``slo_ms − device_ms``: finite, > 0 and at most the largest SLO.

Each rule raises the ``GraftError`` whose code the reply carries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.contract import wire
from common.contract.errors import BadTensor, InvalidRequest

FLOAT32 = np.dtype(np.float32).name
BUDGET_RATIO = 1.25  # width of a budget class: budgets within 25% of each other are planned alike


def budget_class(budget_ms: float) -> int:
    """The geometric budget class of ``budget_ms`` (ingress statistics and the planner agree on it)."""
    return math.floor(math.log(max(budget_ms, 1e-3)) / math.log(BUDGET_RATIO))


@dataclass(frozen=True, slots=True)
class Limits:
    max_tensor_bytes: int
    max_slo_ms: float


def sane_id(value: object) -> bool:
    """Ids become part of Redis key names: printable, no whitespace, bounded."""
    # isprintable() already refuses every whitespace but the ASCII space.
    return isinstance(value, str) and 0 < len(value) <= wire.MAX_STR and value.isprintable() and " " not in value


def check_ids(req_id: object, client: object) -> None:
    if not sane_id(req_id) or not sane_id(client):
        raise InvalidRequest("req_id and client must be printable strings without whitespace (1-256 characters)")


def check_size(nbytes: int, limits: Limits) -> None:
    if nbytes > limits.max_tensor_bytes:
        raise InvalidRequest(f"tensor of {nbytes} bytes exceeds the limit of {limits.max_tensor_bytes}",
                             size=nbytes)


def check_tensor(model: str, cut: int, dtype: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """``dtype`` and ``shape`` of one request's tensor against the cut's per-request shape."""
    if dtype != FLOAT32:
        raise BadTensor(f"tensor dtype must be float32, got {dtype}", expected=FLOAT32, got=dtype)
    if shape != expected:
        raise BadTensor(f"{model} at cut {cut} expects a per-request tensor of shape {list(expected)} "
                        f"(no batch dimension), got {list(shape)}", expected=list(expected), got=list(shape))


def server_budget_ms(req: wire.Request, limits: Limits) -> float:
    """The server-side budget of ``req``, or the ``InvalidRequest`` saying why it has none."""
    if req.device_ms is not None and req.device_ms < 0:
        raise InvalidRequest(f"device_ms must not be negative, got {req.device_ms}")
    if req.slo_ms is not None and not 0 < req.slo_ms <= limits.max_slo_ms:
        raise InvalidRequest(f"slo_ms must be in (0, {limits.max_slo_ms:g}], got {req.slo_ms:g}")
    budget = req.server_budget_ms()
    if budget is None:
        raise InvalidRequest("request carries no budget: set budget_ms, or slo_ms (and device_ms)")
    if not math.isfinite(budget) or budget <= 0:
        raise InvalidRequest(f"server budget must be a positive number of ms, got {budget:g}", budget_ms=budget)
    if budget > limits.max_slo_ms:
        raise InvalidRequest(f"server budget of {budget:g} ms exceeds the limit of {limits.max_slo_ms:g} ms",
                             budget_ms=budget)
    return budget

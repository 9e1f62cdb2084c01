"""Turning a group-stream entry into a job the replica can batch, or into the error to answer.

The ingress already validated every request, but a replica trusts nothing it reads: an entry may be
written by hand, by an older ingress, or be garbage. A bad entry becomes a ``Rejection`` carrying the
ids to answer it with (from the envelope when it decodes, else ``wire.peek_ids``); one whose ids cannot
be read has nobody to answer and is dead-lettered instead. Nothing here touches Redis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from common import wire
from common.batching import Pending
from common.errors import BadCut, BadTensor, GraftError, InvalidRequest
from common.models import ModelInfo
from common.routing import GroupSpec


@dataclass(slots=True)
class Job:
    """One admitted request: its stream entry, the decoded request, and its place in the EDF queue.

    ``pending.req_id`` is the *entry id*, unique per stream, so two requests that reuse a ``req_id``
    still queue separately (the idempotent reply answers only the first).
    """

    entry_id: str
    request: wire.Request
    pending: Pending
    received: float
    deliveries: int = 1
    admitted: float = 0.0  # when this replica read it (time.time()); splits queueing from batching hold

    @property
    def client(self) -> str:
        return self.request.client

    @property
    def req_id(self) -> str:
        return self.request.req_id

    @property
    def deadline(self) -> float:
        return self.pending.deadline


@dataclass(slots=True)
class Rejection:
    entry_id: str
    error: GraftError
    req_id: str | None  # None: unanswerable, dead-letter it
    client: str | None
    received: float
    payload: bytes | None = None


class Intake:
    """Admission rules of one group: its model, the cuts its runner holds, the tensor each cut takes."""

    def __init__(self, info: ModelInfo, spec: GroupSpec, *, max_tensor_bytes: int = wire.MAX_TENSOR_BYTES,
                 max_budget_s: float = 60.0) -> None:
        self.info = info
        self.spec = spec
        self.max_tensor_bytes = max_tensor_bytes
        self.max_budget_s = max_budget_s

    def admit(self, entry_id: str, payload: bytes | None, *, now: float | None = None,
              deliveries: int = 1) -> Job | Rejection:
        now = time.time() if now is None else now
        try:
            req = wire.decode_request(payload, self.max_tensor_bytes)
        except GraftError as exc:
            req_id, client = wire.peek_ids(payload) if payload is not None else (None, None)
            return Rejection(entry_id, exc, req_id, client, now, payload)
        try:
            tensor = self._check(req)
        except GraftError as exc:
            return Rejection(entry_id, exc, req.req_id, req.client, req.received or now, payload)
        req.tensor = tensor
        received = req.received if req.received is not None else now
        # An entry without a deadline did not come through an ingress; the largest budget bounds it.
        deadline = req.deadline if req.deadline is not None else received + self.max_budget_s
        return Job(entry_id, req, Pending(entry_id, req.cut, deadline, received), received, deliveries, now)

    def _check(self, req: wire.Request) -> np.ndarray:
        if req.model != self.spec.model:
            raise InvalidRequest(f"request for {req.model!r} reached group {self.spec.id} of {self.spec.model!r}",
                                 model=req.model, group=self.spec.id)
        if not self.spec.min_cut <= req.cut < self.info.n_blocks:
            raise BadCut(f"cut {req.cut} is not served by group {self.spec.id} "
                         f"({self.spec.min_cut}..{self.info.n_blocks - 1} of {self.spec.model})",
                         model=req.model, cut=req.cut)
        t = req.tensor
        if t is None:
            raise BadTensor("workers take inline tensors only (blob references are not supported)")
        want = self.info.cut_shape(req.cut)
        if t.ndim == len(want) + 1 and t.shape[0] == 1:
            t = t[0]
        if t.dtype != np.float32 or tuple(t.shape) != want:
            raise BadTensor(f"{req.model} at cut {req.cut} takes float32 {list(want)}, "
                            f"got {t.dtype.name} {list(t.shape)}", expected=list(want), got=list(t.shape))
        return t

"""Turning a group-stream entry into a job the replica can batch, or into the error to answer.

The ingress already validated every request, but a replica trusts nothing it reads: an entry may be
written by hand, by an older ingress, or be garbage. A bad entry becomes a ``Rejection`` carrying the
ids to answer it with (from the envelope when it decodes, else ``wire.peek_ids``); one whose ids cannot
be read — or that are not ids the ingress would answer (``admission.sane_id``: printable, no whitespace,
1..256 characters) — has nobody to answer and is dead-lettered instead. Nothing here touches Redis.

A blob request (its tensor's bytes at ``keys.blob(req_id)``) is checked on its metadata by ``admit``
and becomes a job without a tensor (``Job.blob``); the replica GETs the blobs of everything it read in
one pipelined round trip and hands each job its bytes with ``attach``, which decodes them into a copy.
A blob that is gone by then is answered ``DEADLINE_EXCEEDED`` when the request's deadline has passed
(the blob's TTL runs out with the deadline: the request was late, as it would have been inline), and
``BAD_TENSOR`` while the deadline is still ahead (the producer's TTL did not cover its budget, or the
key was deleted: a client fault a retry would repeat). The blob is left in place until the reply is
sent, so a replica that crashes, or a reaper that reclaims the entry, can read it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from common import admission
from common.batching import Pending
from common.contract import keys, wire
from common.contract.errors import BadCut, GraftError, InvalidRequest
from common.model.zoo import ModelInfo


@dataclass(slots=True)
class Job:
    """One admitted request: its stream entry, the decoded request, and its place in the EDF queue.

    ``pending.req_id`` is the job's ``key``: its stream and entry id (``job_key``). Two requests that reuse
    a ``req_id`` still queue separately (the idempotent reply answers only the first), and so do two
    entries of equal id on two streams the replica reads at once (its group's and one it drains: entry
    ids are unique per stream only, and two streams fed in the same millisecond often share one).
    """

    entry_id: str
    request: wire.Request
    pending: Pending
    received: float
    deliveries: int = 1
    # When it entered the group's stream: the Redis clock of its entry id, as ``received`` is (or when this
    # replica read it, for an id that carries no time). Splits the path before (ingress, hop) from the
    # wait for its batch — in the stream until a replica of the group is free, then in the EDF queue.
    admitted: float = 0.0
    stream: str = ""  # the group stream it came from (acked there; its epoch and group label the reply)
    epoch: int | None = None
    group: str | None = None

    @property
    def key(self) -> str:
        """What the batch loop knows this job by (``job_key``)."""
        return self.pending.req_id

    @property
    def client(self) -> str:
        return self.request.client

    @property
    def req_id(self) -> str:
        return self.request.req_id

    @property
    def deadline(self) -> float:
        return self.pending.deadline

    @property
    def blob(self) -> str | None:
        """The blob key holding this request's tensor (delete it once answered), or None when inline."""
        return self.request.blob

    @property
    def needs_blob(self) -> bool:
        """A blob request whose tensor has not been fetched yet."""
        return self.request.tensor is None


@dataclass(slots=True)
class Rejection:
    entry_id: str
    error: GraftError
    req_id: str | None  # None: unanswerable, dead-letter it
    client: str | None
    received: float
    payload: bytes | None = None
    blob: str | None = None  # the request's blob key, to delete with the reply
    source: str | None = None  # the submission (graft:ingress entry id) it answers
    stream: str = ""


class Intake:
    """Admission rules of one model: every cut of it runs (a replica holds the whole model), each cut
    takes the tensor shape the model produces before it."""

    def __init__(self, info: ModelInfo, *, max_tensor_bytes: int = wire.MAX_TENSOR_BYTES,
                 max_budget_s: float = 60.0) -> None:
        self.info = info
        self.max_tensor_bytes = max_tensor_bytes
        self.max_budget_s = max_budget_s
        self._limits = admission.Limits(max_tensor_bytes, max_budget_s * 1000.0)

    def admit(self, entry_id: str, payload: bytes | None, *, now: float | None = None,
              deliveries: int = 1, stream: str = "") -> Job | Rejection:
        now = time.time() if now is None else now
        try:
            req = wire.decode_request(payload, self.max_tensor_bytes)
            admission.check_ids(req.req_id, req.client)  # as the ingress: ids become parts of key names
        except GraftError as exc:
            req_id, client = wire.peek_ids(payload) if payload is not None else (None, None)
            if not (admission.sane_id(req_id) and admission.sane_id(client)):
                req_id = client = None  # nobody to answer: dead-lettered, as the ingress does
            return Rejection(entry_id, exc, req_id, client, now, payload,
                             source=wire.peek_source(payload) if req_id is not None else None, stream=stream)
        source = req.source or entry_id
        try:
            req.tensor = self._check(req)
            # An entry without a deadline did not come through an ingress: its budget passes the ingress's
            # rules (a missing, negative or oversized one is INVALID_REQUEST there, so here too) and sets it.
            budget_ms = None if req.deadline is not None else admission.server_budget_ms(req, self._limits)
        except GraftError as exc:
            return Rejection(entry_id, exc, req.req_id, req.client, req.received or now, payload, req.blob,
                             source, stream)
        received = req.received if req.received is not None else now
        req.source = source
        deadline = received + budget_ms / 1000.0 if budget_ms is not None else req.deadline
        assert deadline is not None
        where = keys.parse_group_stream(stream) if stream else None
        return Job(entry_id, req, Pending(job_key(stream, entry_id), req.cut, deadline, received), received, deliveries,
                   _entered(entry_id, received, now),
                   stream, None if where is None else where[0], None if where is None else where[1])

    @staticmethod
    def blob_expired(job: Job, data: object, now: float) -> bool:
        """The blob is gone and so is the deadline: answer ``DEADLINE_EXCEEDED`` like any late request."""
        return data is None and job.deadline <= now

    def attach(self, job: Job, data: object) -> Job | Rejection:
        """Give a blob job the tensor decoded (a copy) from ``data``, what GET of its blob answered;
        a missing or malformed blob is ``BAD_TENSOR`` (check ``blob_expired`` first)."""
        req = job.request
        assert req.blob is not None and req.blob_meta is not None
        try:
            req.tensor = self._shape(req, wire.decode_blob(req.blob_meta, data, req.blob))
        except GraftError as exc:
            return Rejection(job.entry_id, exc, req.req_id, req.client, job.received, None, req.blob,
                             req.source, job.stream)
        return job

    def _check(self, req: wire.Request) -> np.ndarray | None:
        if req.model != self.info.name:
            raise InvalidRequest(f"request for {req.model!r} reached a replica of {self.info.name!r}",
                                 model=req.model)
        if not 0 <= req.cut < self.info.n_blocks:
            raise BadCut(f"cut {req.cut} is not valid for {req.model} (0..{self.info.n_blocks - 1})",
                         model=req.model, cut=req.cut)
        t = req.tensor
        if t is None:
            meta = req.blob_meta
            assert meta is not None, "decode_request leaves no request without a tensor or blob metadata"
            self._check_meta(req, meta.dtype, meta.shape)
            return None  # fetched from the blob, then checked again by attach
        return self._shape(req, t)

    def _shape(self, req: wire.Request, t: np.ndarray) -> np.ndarray:
        self._check_meta(req, t.dtype.name, tuple(t.shape))
        return t

    def _check_meta(self, req: wire.Request, dtype: str, shape: tuple[int, ...]) -> None:
        admission.check_tensor(req.model, req.cut, dtype, tuple(shape), self.info.cut_shape(req.cut))


def job_key(stream: str, entry_id: str) -> str:
    """A job's name in the batch loop: the entry id, which is unique per stream only, and its stream."""
    return f"{entry_id}@{stream}"


def _entered(entry_id: str, received: float, now: float) -> float:
    """When entry ``entry_id`` was added (its id's Redis time), kept within [received, now]."""
    ms, sep, seq = entry_id.partition("-")
    if not (sep and ms.isdigit() and seq.isdigit()):
        return now
    return min(max(int(ms) / 1000.0, received), now)

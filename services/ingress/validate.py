"""Request validation at the edge: every rule maps to one error code, and nothing here touches Redis.

A request is checked in the order a client would fix it: the envelope decodes (``INVALID_REQUEST`` /
``BAD_TENSOR``), the message and tensor fit the size limits (``INVALID_REQUEST``), the model is served
by the current plan (``UNKNOWN_MODEL``), the cut exists (``BAD_CUT``), the tensor is float32 of the
cut's per-request shape (``BAD_TENSOR``), the budget is sane (``INVALID_REQUEST``). A message that
fails before its ids can be read has nobody to answer; ``answerable_ids`` tells the service so.

A blob request (``blob`` = ``keys.blob(req_id)``, the tensor's dtype and shape in the envelope) passes
the same rules on its metadata; whether the blob exists with exactly ``prod(shape) * 4`` bytes needs
Redis, so the service asks (one pipelined STRLEN per blob request of a batch) and ``blob_error`` judges
the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from common import admission
from common.admission import FLOAT32, Limits, sane_id
from common.contract import wire
from common.contract.errors import BadTensor, InvalidRequest, UnknownModel
from common.model.shapes import Described, ModelShapes, ShapeBook

# Envelope fields besides the tensor bytes (ids, model, numbers, msgpack framing) stay far below this.
ENVELOPE_SLACK_BYTES = 64 * 1024

Describe = Callable[[str, int | None], Described]
__all__ = ["FLOAT32", "Limits", "ModelCatalog", "Validator", "answerable_ids", "blob_error", "sane_id"]


def answerable_ids(raw: object) -> tuple[str, str] | None:
    """``(req_id, client)`` of a message that failed validation, or None when it cannot be answered."""
    req_id, client = wire.peek_ids(raw)
    if sane_id(req_id) and sane_id(client):
        assert req_id is not None and client is not None
        return req_id, client
    return None


class ModelCatalog:
    """Per-cut shapes of the served models: the plan's (``plan["shapes"]``, no torch), else described here.

    ``describe_fn`` (default: ``common.model.zoo.describe``, imported on first use: it needs torch) runs
    only for a model whose shapes the plan does not carry at the served resolution.
    """

    def __init__(self, resolution: int | None, describe_fn: Describe | None = None) -> None:
        self.book = ShapeBook(resolution, describe_fn)
        self._served: frozenset[str] = frozenset()

    def prepare(self, models: Iterable[str], published: Mapping[str, ModelShapes] | None = None) -> None:
        """Learn the shapes of the models not seen yet, without changing the served set (may run in a thread)."""
        self.book.learn(models, published)

    def serve(self, models: Iterable[str], published: Mapping[str, ModelShapes] | None = None) -> None:
        """Make ``models`` the served set (a plan change); models not prepared yet are prepared now."""
        served = frozenset(models)
        self.book.learn(served, published)
        self._served = served

    @property
    def served(self) -> frozenset[str]:
        return self._served

    def shapes(self, model: str) -> ModelShapes:
        if model not in self._served:
            known = ", ".join(sorted(self._served)) or "none yet"
            raise UnknownModel(f"model {model!r} is not served by the current plan (served: {known})",
                               model=model, served=sorted(self._served))
        return self.book[model]

    def cut_shape(self, model: str, cut: int) -> tuple[int, ...]:
        return self.shapes(model).cut_shape(cut)  # UNKNOWN_MODEL, BAD_CUT


class Validator:
    def __init__(self, catalog: ModelCatalog, limits: Limits) -> None:
        self.catalog = catalog
        self.limits = limits

    def check(self, raw: object) -> wire.Request:
        """The decoded request with ``budget_ms`` set to the server budget, or the GraftError to reply."""
        if isinstance(raw, bytes | bytearray | memoryview) and len(raw) > self.limits.max_tensor_bytes + ENVELOPE_SLACK_BYTES:
            raise InvalidRequest(f"message of {len(raw)} bytes exceeds the limit of "
                                 f"{self.limits.max_tensor_bytes} tensor bytes", size=len(raw))
        req = wire.decode_request(raw)
        admission.check_ids(req.req_id, req.client)
        # An inline tensor is checked on the array itself (the hot path: no metadata object per request).
        t = req.tensor
        meta = (t.dtype.name if t.dtype != np.float32 else FLOAT32, t.shape, t.nbytes) if t is not None else (
            None if req.blob_meta is None else (req.blob_meta.dtype, req.blob_meta.shape, req.blob_meta.nbytes))
        if meta is None:  # decode_request never leaves both out
            raise BadTensor("request carries neither a tensor nor a blob key")
        admission.check_size(meta[2], self.limits)
        expected = self.catalog.cut_shape(req.model, req.cut)  # UNKNOWN_MODEL, BAD_CUT
        admission.check_tensor(req.model, req.cut, meta[0], meta[1], expected)
        req.budget_ms = admission.server_budget_ms(req, self.limits)
        return req


def blob_error(req: wire.Request, strlen: object) -> BadTensor | None:
    """The error of a blob request given what ``STRLEN`` of its key answered (None: the blob is fine).

    STRLEN answers 0 for a missing key, an error for a key that is not a string.
    """
    assert req.blob is not None and req.blob_meta is not None
    want = req.blob_meta.nbytes
    if not isinstance(strlen, int):  # WRONGTYPE
        return BadTensor(f"blob {req.blob} is not a string of raw tensor bytes", key=req.blob)
    got = strlen
    if got == want:
        return None
    if got == 0:
        return BadTensor(f"blob {req.blob} does not exist (expired, or never written: SET it before the XADD)",
                         key=req.blob)
    return BadTensor(f"blob {req.blob} holds {got} bytes, shape {list(req.blob_meta.shape)} of "
                     f"{req.blob_meta.dtype} needs {want}", key=req.blob, expected=want, got=got)

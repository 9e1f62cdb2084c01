"""The wire contract: a versioned msgpack envelope carrying requests, replies and plans.

Every stream entry has one field, ``m`` (see ``common.contract.keys.FIELD``), holding ``packb(envelope)``::

    {"v": 1, "kind": "request", "req_id": str, "client": str, "model": str, "cut": int,
     "tensor": {"dtype": "float32", "shape": [1, 64, 56, 56], "data": <bytes> | None},
     "budget_ms": float | None, "slo_ms": float | None, "device_ms": float | None,
     "deadline": float | None,          # absolute, server clock (unix seconds); set by ingress only
     "received": float | None,          # when Redis accepted the graft:ingress entry (unix seconds); ingress only
     "source": str | None,              # the id of the request's graft:ingress entry; set by ingress only
     "blob": str | None}                # "graft:blob:{req_id}": the tensor's bytes are stored there

    {"v": 1, "kind": "reply", "req_id": str, "ok": bool,
     "tensor": {...} | None,                                     # when ok
     "error": {"code": str, "message": str, "details": {}} | None,  # when not ok
     "server_ms": float, "epoch": int | None, "group": str | None, "batch": int | None,
     "source": str | None,                                        # the graft:ingress entry id answered
     "timings": {"ingress_ms", "queue_ms", "wait_ms", "compute_ms", ...} | None}  # where server_ms went

    {"v": 1, "kind": "plan", "plan": {...}}                       # the plan file's JSON shape

A request tensor travels either *inline* (``blob`` nil, ``tensor.data`` the raw C-order bytes) or as a
*blob* (``blob`` set, ``tensor`` carries only ``dtype`` and ``shape``, ``data`` nil or absent): the
producer first ``SET``s the raw bytes at ``keys.blob(req_id)`` with a TTL (``PX``) of at least the
request's budget plus a margin, then XADDs the request. The blob key must be exactly
``keys.blob(req_id)`` (``Request.blob_meta`` holds the decoded metadata); the ingress checks the key
holds ``prod(shape) * itemsize`` bytes, and the replica that answers the request deletes the key.

Decoding never raises anything but ``InvalidRequest`` (or its ``BadTensor`` subclass) on bad input,
and decoded tensors own their memory (a copy), so an in-place first block cannot corrupt a buffer;
``decode_blob`` copies blob bytes the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from common.contract import keys
from common.contract.errors import BadTensor, ErrorCode, GraftError, InvalidRequest

VERSION = 1

# Hard limits; the ingress may enforce tighter ones from settings.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_TENSOR_BYTES = 48 * 1024 * 1024
MAX_NDIM = 8
MAX_STR = 256

DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name) for name in ("float32", "float16", "float64", "int64", "int32", "uint8", "bool")
}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """A tensor's dtype and shape without its bytes: what a blob request carries in its envelope."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """The length the tensor's raw bytes must have."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @classmethod
    def of(cls, arr: npt.NDArray[Any]) -> TensorMeta:
        return cls(arr.dtype.name, arr.shape)  # numpy shapes are tuples of ints already

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": None}


@dataclass(slots=True)
class Request:
    req_id: str
    client: str
    model: str
    cut: int
    tensor: npt.NDArray[Any] | None
    budget_ms: float | None = None
    slo_ms: float | None = None
    device_ms: float | None = None
    deadline: float | None = None
    received: float | None = None
    source: str | None = None  # id of the request's graft:ingress entry (one submission), set by the ingress
    blob: str | None = None  # keys.blob(req_id) when the tensor's bytes are stored there
    blob_meta: TensorMeta | None = None  # dtype and shape of a blob tensor (from the envelope)

    @property
    def meta(self) -> TensorMeta | None:
        """dtype and shape of the request's tensor, inline or blob."""
        return TensorMeta.of(self.tensor) if self.tensor is not None else self.blob_meta

    def server_budget_ms(self) -> float | None:
        """The budget the server has: explicit ``budget_ms``, else ``slo_ms - device_ms``."""
        if self.budget_ms is not None:
            return self.budget_ms
        if self.slo_ms is not None:
            return self.slo_ms - (self.device_ms or 0.0)
        return None


@dataclass(slots=True)
class ErrorInfo:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Reply:
    req_id: str
    ok: bool
    tensor: npt.NDArray[Any] | None = None
    error: ErrorInfo | None = None
    server_ms: float = 0.0
    epoch: int | None = None
    group: str | None = None
    batch: int | None = None
    timings: dict[str, float] | None = None
    source: str | None = None  # the submission answered: the request's graft:ingress entry id

    @classmethod
    def failure(cls, req_id: str, exc: GraftError, **kw: Any) -> Reply:
        return cls(req_id=req_id, ok=False, error=ErrorInfo(str(exc.code), exc.message, dict(exc.details)), **kw)

    @classmethod
    def result(cls, req_id: str, tensor: npt.NDArray[Any], **kw: Any) -> Reply:
        return cls(req_id=req_id, ok=True, tensor=tensor, **kw)


# ---------------------------------------------------------------------------------------------- tensors


def _wire_array(arr: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], str]:
    """``arr`` C-contiguous, and its dtype's name (``dtype.name`` costs about a microsecond: ask once)."""
    a = arr if arr.flags.c_contiguous else np.array(arr, order="C")
    name = a.dtype.name
    if name not in DTYPES:
        raise BadTensor(f"dtype {name} is not supported on the wire", dtype=name)
    if a.nbytes > MAX_TENSOR_BYTES:
        raise BadTensor(f"tensor of {a.nbytes} bytes exceeds the limit of {MAX_TENSOR_BYTES}")
    return a, name


def tensor_bytes(arr: npt.NDArray[Any]) -> tuple[TensorMeta, bytes]:
    """The metadata and raw C-order bytes of ``arr`` (what an inline tensor or a blob carries)."""
    a, name = _wire_array(arr)
    return TensorMeta(name, a.shape), a.tobytes()


def encode_tensor(arr: npt.NDArray[Any]) -> dict[str, Any]:
    # The hot path of every routed request (the ingress re-encodes it): no intermediate objects.
    a, name = _wire_array(arr)
    return {"dtype": name, "shape": list(a.shape), "data": a.tobytes()}


def decode_meta(obj: Any, max_bytes: int = MAX_TENSOR_BYTES) -> TensorMeta:
    """Decode and check the ``dtype`` and ``shape`` of a tensor map (``data`` is not looked at)."""
    if not isinstance(obj, dict):
        raise BadTensor("tensor must be a map with dtype, shape and data")
    dtype_name, shape = obj.get("dtype"), obj.get("shape")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise BadTensor(f"unsupported tensor dtype {dtype_name!r}", allowed=sorted(DTYPES))
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise BadTensor(f"tensor shape must be a list of at most {MAX_NDIM} dimensions")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31 for d in shape):
        raise BadTensor("tensor dimensions must be non-negative integers")
    meta = TensorMeta(dtype_name, tuple(shape))
    if meta.nbytes > max_bytes:
        raise BadTensor(f"tensor of {meta.nbytes} bytes exceeds the limit of {max_bytes}")
    return meta


def decode_tensor(obj: Any, max_bytes: int = MAX_TENSOR_BYTES) -> npt.NDArray[Any]:
    """Decode ``{"dtype", "shape", "data"}`` into a fresh, writable array (never a view of ``data``)."""
    meta = decode_meta(obj, max_bytes)
    data = obj.get("data")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadTensor("tensor data must be raw bytes")
    if len(data) != meta.nbytes:
        raise BadTensor(f"tensor data has {len(data)} bytes, shape {list(meta.shape)} of {meta.dtype} "
                        f"needs {meta.nbytes}")
    return _array(meta, data)


def decode_blob(meta: TensorMeta, data: Any, key: str = "blob") -> npt.NDArray[Any]:
    """The tensor stored at a blob key, as a fresh, writable array; ``data`` is what GET returned."""
    if data is None:
        raise BadTensor(f"blob {key} does not exist (expired, deleted, or never written)", key=key)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadTensor(f"blob {key} does not hold raw bytes", key=key)
    if len(data) != meta.nbytes:
        raise BadTensor(f"blob {key} holds {len(data)} bytes, shape {list(meta.shape)} of {meta.dtype} "
                        f"needs {meta.nbytes}", key=key, expected=meta.nbytes, got=len(data))
    return _array(meta, data)


def _array(meta: TensorMeta, data: bytes | bytearray | memoryview) -> npt.NDArray[Any]:
    # frombuffer is a read-only view of data; the copy owns its memory (an in-place block may write it).
    return np.frombuffer(data, dtype=DTYPES[meta.dtype]).reshape(meta.shape).copy()


# -------------------------------------------------------------------------------------------- envelopes


def packb(obj: dict[str, Any]) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def unpackb(raw: Any, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Unpack one envelope; anything but a versioned map raises InvalidRequest."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidRequest("message must be msgpack bytes")
    if len(raw) > max_bytes:
        raise InvalidRequest(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=1 << 20,
            max_array_len=1 << 16, max_map_len=1 << 12, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise InvalidRequest(f"message is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("message must be a msgpack map")
    v = obj.get("v")
    if v != VERSION:
        raise InvalidRequest(f"unsupported envelope version {v!r}; this server speaks v{VERSION}")
    return obj


def _str(obj: dict[str, Any], key: str, required: bool = True) -> str | None:
    val = obj.get(key)
    if val is None and not required:
        return None
    if not isinstance(val, str) or not val or len(val) > MAX_STR:
        raise InvalidRequest(f"field {key!r} must be a non-empty string of at most {MAX_STR} characters")
    return val


def _num(obj: dict[str, Any], key: str) -> float | None:
    val = obj.get(key)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        raise InvalidRequest(f"field {key!r} must be a finite number")
    return float(val)


def encode_request(req: Request) -> bytes:
    """The request's envelope. With ``blob`` set the tensor travels as metadata only (``data`` nil): from
    ``blob_meta``, else from ``tensor`` — whose bytes the producer stores at the blob key itself."""
    if req.blob is None:
        tensor = None if req.tensor is None else encode_tensor(req.tensor)
    else:
        meta = req.blob_meta if req.blob_meta is not None else req.meta
        tensor = None if meta is None else meta.to_wire()
    obj: dict[str, Any] = {
        "v": VERSION, "kind": "request", "req_id": req.req_id, "client": req.client, "model": req.model,
        "cut": req.cut, "tensor": tensor,
        "budget_ms": req.budget_ms, "slo_ms": req.slo_ms, "device_ms": req.device_ms,
        "deadline": req.deadline, "received": req.received, "source": req.source, "blob": req.blob,
    }
    return packb(obj)


def _peek_fields(raw: Any, wanted: frozenset[str]) -> dict[str, Any]:
    """The top-level fields ``wanted`` of a msgpack map, read one by one so that any *other* field —
    huge, of a wrong type, truncated after the wanted ones — cannot hide them. Best effort: {}."""
    if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) > MAX_MESSAGE_BYTES:
        return {}
    up = msgpack.Unpacker(raw=False, max_buffer_size=max(len(raw), 1), max_ext_len=0, strict_map_key=False)
    found: dict[str, Any] = {}
    try:
        up.feed(raw)
        for _ in range(min(up.read_map_header(), 4096)):
            key = up.unpack()
            if isinstance(key, str) and key in wanted:
                found[key] = up.unpack()
                if len(found) == len(wanted):
                    break
            else:
                up.skip()
    except Exception:  # not a map, truncated, or garbage later on: keep what was read before it
        pass
    return found


_IDS = frozenset(("req_id", "client"))


def peek_ids(raw: Any) -> tuple[str | None, str | None]:
    """Best effort ``(req_id, client)`` of a message that failed to decode, so it can still be answered."""
    got = _peek_fields(raw, _IDS)
    rid, client = got.get("req_id"), got.get("client")
    return (rid if _short_str(rid) else None), (client if _short_str(client) else None)


def peek_source(raw: Any) -> str | None:
    """Best effort: the submission a routed message answers (its ``graft:ingress`` entry id, set by the
    ingress), so a reply written for it from a group stream — a dead letter, a sweep — is one the reply
    ledger recognises as an answer to the same submission, whoever answered it first."""
    source = _peek_fields(raw, frozenset(("source",))).get("source")
    return source if _short_str(source) else None


def peek_blob(raw: Any) -> bool:
    """Best effort: does a message that failed to decode name a blob (so its owner's blob can be freed)?"""
    return _peek_fields(raw, frozenset(("blob",))).get("blob") is not None


def _short_str(s: Any) -> bool:
    return isinstance(s, str) and 0 < len(s) <= MAX_STR


def decode_request(raw: Any, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> Request:
    obj = unpackb(raw)
    if obj.get("kind") != "request":
        raise InvalidRequest(f"expected a request envelope, got kind {obj.get('kind')!r}")
    req_id = _str(obj, "req_id")
    client = _str(obj, "client")
    model = _str(obj, "model")
    cut = obj.get("cut")
    if not isinstance(cut, int) or isinstance(cut, bool):
        raise InvalidRequest("field 'cut' must be an integer")
    assert req_id is not None and client is not None and model is not None
    blob = _str(obj, "blob", required=False)
    t = obj.get("tensor")
    tensor: npt.NDArray[Any] | None = None
    meta: TensorMeta | None = None
    if blob is None:
        if t is None:
            raise BadTensor("request carries neither a tensor nor a blob key")
        tensor = decode_tensor(t, max_tensor_bytes)
    else:
        want = keys.blob(req_id)
        if blob != want:
            raise BadTensor(f"blob key must be {want!r} (keys.blob of the req_id), got {blob!r}",
                            expected=want, got=blob)
        if not isinstance(t, dict):
            raise BadTensor("a blob request must carry the tensor's dtype and shape in 'tensor'")
        if t.get("data") is not None:
            raise BadTensor("request carries both inline tensor data and a blob key")
        meta = decode_meta(t, max_tensor_bytes)
    return Request(
        req_id=req_id, client=client, model=model, cut=cut, tensor=tensor,
        budget_ms=_num(obj, "budget_ms"), slo_ms=_num(obj, "slo_ms"), device_ms=_num(obj, "device_ms"),
        deadline=_num(obj, "deadline"), received=_num(obj, "received"), source=_str(obj, "source", required=False),
        blob=blob, blob_meta=meta,
    )


def encode_reply(rep: Reply) -> bytes:
    obj: dict[str, Any] = {
        "v": VERSION, "kind": "reply", "req_id": rep.req_id, "ok": rep.ok,
        "tensor": None if rep.tensor is None else encode_tensor(rep.tensor),
        "error": None if rep.error is None else
        {"code": rep.error.code, "message": rep.error.message, "details": rep.error.details},
        "server_ms": rep.server_ms, "epoch": rep.epoch, "group": rep.group, "batch": rep.batch,
        "timings": rep.timings, "source": rep.source,
    }
    return packb(obj)


def decode_reply(raw: Any) -> Reply:
    obj = unpackb(raw)
    if obj.get("kind") != "reply":
        raise InvalidRequest(f"expected a reply envelope, got kind {obj.get('kind')!r}")
    req_id = _str(obj, "req_id")
    assert req_id is not None
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        raise InvalidRequest("field 'ok' must be a boolean")
    err = obj.get("error")
    error = None
    if err is not None:
        if not isinstance(err, dict) or not isinstance(err.get("code"), str):
            raise InvalidRequest("field 'error' must be a map with a code")
        details = err.get("details") or {}
        error = ErrorInfo(err["code"], str(err.get("message", "")), details if isinstance(details, dict) else {})
    if ok and obj.get("tensor") is None:
        raise InvalidRequest("an ok reply must carry a tensor")
    if not ok and error is None:
        error = ErrorInfo(str(ErrorCode.INTERNAL), "error reply without an error")
    tensor = None if obj.get("tensor") is None else decode_tensor(obj["tensor"])
    epoch, group, batch = obj.get("epoch"), obj.get("group"), obj.get("batch")
    raw_t = obj.get("timings")
    timings = ({str(k): float(v) for k, v in raw_t.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
               if isinstance(raw_t, dict) else None)
    return Reply(
        req_id=req_id, ok=ok, tensor=tensor, error=error, server_ms=_num(obj, "server_ms") or 0.0,
        epoch=epoch if isinstance(epoch, int) else None, group=group if isinstance(group, str) else None,
        batch=batch if isinstance(batch, int) else None, timings=timings,
        source=obj.get("source") if _short_str(obj.get("source")) else None,
    )


def encode_plan(plan: dict[str, Any]) -> bytes:
    return packb({"v": VERSION, "kind": "plan", "plan": plan})


def decode_plan(raw: Any) -> dict[str, Any]:
    obj = unpackb(raw)
    if obj.get("kind") != "plan" or not isinstance(obj.get("plan"), dict):
        raise InvalidRequest("expected a plan envelope")
    plan: dict[str, Any] = obj["plan"]
    return plan


def encode_message(kind: str, body: dict[str, Any]) -> bytes:
    """Envelope for control/statistics messages (``kind`` names the schema)."""
    return packb({"v": VERSION, "kind": kind, **body})


def decode_message(raw: Any, kind: str) -> dict[str, Any]:
    obj = unpackb(raw)
    if obj.get("kind") != kind:
        raise InvalidRequest(f"expected a {kind!r} envelope, got kind {obj.get('kind')!r}")
    return obj

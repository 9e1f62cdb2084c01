"""Malformed messages, by kind: what a careless or hostile producer can XADD, and whether it can be answered.

Each ``Kind`` builds one stream entry's fields for a ``(req_id, client)`` and says whether those ids can
be read from it (``readable``): a readable message must get exactly one reply, an unreadable one can
only be dead-lettered. The suite sends every kind to ``graft:ingress`` and straight to a group stream
(where a replica, not the ingress, is the first to read it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from common.contract import keys

Fields = dict[bytes, bytes]


@dataclass(frozen=True)
class Kind:
    name: str
    readable: bool
    build: Callable[[str, str, tuple[int, ...]], Fields]  # (req_id, client, cut-0 shape) → entry fields
    blob: bool = False  # needs a (wrong) blob SET first: build returns it under b"__blob__"


def _pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def _tensor(shape: tuple[int, ...], dtype: str = "float32", data: bytes | None = None) -> dict[str, Any]:
    n = math.prod(shape) * np.dtype(dtype).itemsize if dtype in ("float32", "float64", "int64", "uint8") else 4
    return {"dtype": dtype, "shape": list(shape), "data": data if data is not None else b"\0" * n}


def _base(rid: str, client: str, shape: tuple[int, ...], /, **over: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"v": 1, "kind": "request", "req_id": rid, "client": client, "model": "resnet18",
                           "cut": 0, "tensor": _tensor(shape), "budget_ms": 2000.0}
    for k, v in over.items():
        if v is _DROP:
            env.pop(k, None)
        else:
            env[k] = v
    return env


_DROP = object()


def _m(obj: Any) -> Fields:
    return {keys.FIELD: _pack(obj)}


def _env(**over: Any) -> Callable[[str, str, tuple[int, ...]], Fields]:
    return lambda rid, client, shape: _m(_base(rid, client, shape, **over))


def _truncated(rid: str, client: str, shape: tuple[int, ...]) -> Fields:
    full = _pack({"req_id": rid, "client": client, **{k: v for k, v in _base(rid, client, shape).items()
                                                      if k not in ("req_id", "client")}})
    return {keys.FIELD: full[: len(full) // 2]}


def _blob_wrong_len(rid: str, client: str, shape: tuple[int, ...]) -> Fields:
    env = _base(rid, client, shape, blob=keys.blob(rid))
    env["tensor"] = {"dtype": "float32", "shape": list(shape), "data": None}
    return {**_m(env), b"__blob__": b"\0" * 7}


def _blob_missing(rid: str, client: str, shape: tuple[int, ...]) -> Fields:
    env = _base(rid, client, shape, blob=keys.blob(rid))
    env["tensor"] = {"dtype": "float32", "shape": list(shape), "data": None}
    return _m(env)


KINDS: tuple[Kind, ...] = (
    # --- unreadable: nobody to answer
    Kind("garbage-bytes", False, lambda r, c, s: {keys.FIELD: b"\xc1\xff\x00garbage" * 3}),
    Kind("empty-payload", False, lambda r, c, s: {keys.FIELD: b""}),
    Kind("msgpack-int", False, lambda r, c, s: _m(42)),
    Kind("msgpack-list", False, lambda r, c, s: _m([1, 2, 3])),
    Kind("no-m-field", False, lambda r, c, s: {b"x": _pack(_base(r, c, s))}),
    Kind("missing-req-id", False, _env(req_id=_DROP)),
    Kind("missing-client", False, _env(client=_DROP)),
    Kind("req-id-int", False, _env(req_id=12345)),
    Kind("client-too-long", False, _env(client="c" * 300)),
    Kind("req-id-with-space", False, _env(req_id="has space")),
    Kind("client-nested-map", False, _env(client={"a": 1})),
    Kind("ext-type", False, lambda r, c, s: {keys.FIELD: _pack({"v": 1}) + msgpack.packb(msgpack.ExtType(5, b"x"))}),
    # --- readable: must be answered exactly once
    Kind("no-version", True, _env(v=_DROP)),
    Kind("version-2", True, _env(v=2)),
    Kind("kind-reply", True, _env(kind="reply")),
    Kind("unknown-model", True, _env(model="resnet9000")),
    Kind("model-int", True, _env(model=7)),
    Kind("cut-negative", True, _env(cut=-1)),
    Kind("cut-too-large", True, _env(cut=999)),
    Kind("cut-string", True, _env(cut="0")),
    Kind("cut-bool", True, _env(cut=True)),
    Kind("no-tensor", True, _env(tensor=None)),
    Kind("tensor-float64", True, lambda r, c, s: _m(_base(r, c, s, tensor=_tensor(s, "float64")))),
    Kind("tensor-bad-dtype", True, lambda r, c, s: _m(_base(r, c, s, tensor=_tensor(s, "complex7")))),
    Kind("tensor-wrong-shape", True, lambda r, c, s: _m(_base(r, c, s, tensor=_tensor((1, *s))))),
    Kind("tensor-short-data", True, lambda r, c, s: _m(_base(r, c, s, tensor=_tensor(s, data=b"\0" * 10)))),
    Kind("tensor-negative-dim", True, lambda r, c, s: _m(_base(r, c, s, tensor=_tensor((-3, 4), data=b"")))),
    Kind("tensor-many-dims", True, lambda r, c, s: _m(_base(r, c, s, tensor=_tensor((1,) * 20, data=b"\0" * 4)))),
    Kind("tensor-not-a-map", True, _env(tensor="pixels")),
    Kind("tensor-data-str", True, lambda r, c, s: _m(_base(r, c, s, tensor={**_tensor(s), "data": "abc"}))),
    Kind("no-budget", True, _env(budget_ms=_DROP)),
    Kind("budget-negative", True, _env(budget_ms=-5.0)),
    Kind("budget-nan", True, _env(budget_ms=float("nan"))),
    Kind("budget-huge", True, _env(budget_ms=1e12)),
    Kind("budget-string", True, _env(budget_ms="fast")),
    Kind("slo-below-device", True, _env(budget_ms=_DROP, slo_ms=100.0, device_ms=500.0)),
    Kind("deadline-string", True, _env(deadline="tomorrow")),
    Kind("source-int", True, _env(source=5)),
    Kind("blob-wrong-key", True, _env(blob="graft:blob:someone-else")),
    Kind("blob-missing", True, _blob_missing),
    Kind("blob-wrong-length", True, _blob_wrong_len, blob=True),
    Kind("blob-and-inline", True, _env(blob="__self__")),
    Kind("truncated-after-ids", True, _truncated),
)


def fields_for(kind: Kind, rid: str, client: str, shape: tuple[int, ...]) -> tuple[Fields, bytes | None]:
    """The entry's fields, and the bytes to SET at its blob key first (None: no blob)."""
    f = kind.build(rid, client, shape)
    blob = f.pop(b"__blob__", None)
    if kind.name == "blob-and-inline":  # the blob key must be the request's own for this check
        env = msgpack.unpackb(f[keys.FIELD], raw=False)
        env["blob"] = keys.blob(rid)
        f[keys.FIELD] = _pack(env)
    return f, blob

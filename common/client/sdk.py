"""The async client SDK: submit a fragment's tensor, await the result (design section 8).

Used from a plain script::

    import asyncio

    import numpy as np

    from common.client import GraftClient


    async def main() -> None:
        async with GraftClient() as graft:  # REDIS_URL from the environment
            x = np.random.rand(3, 224, 224).astype(np.float32)  # cut 0: the input image itself
            logits = await graft.submit("resnet18", 0, x, slo_ms=500)
            print("class", int(logits.argmax()))


    asyncio.run(main())

One background task reads this client's reply stream (``graft:reply:{client_id}``) with a plain
XREAD that follows the last id, and resolves the future of each ``req_id``; any number of submits
may be in flight at once. A submit that times out raises the builtin ``TimeoutError`` and forgets
its future, so a late reply is dropped; an error reply raises the typed ``GraftError`` of its code
(``Overloaded`` carries ``retry_after_ms``). The wire protocol itself, for other languages, is
documented in ``services/ingress/__init__.py``.

Requests go to this client's ingress shard, ``keys.client_ingress_stream(client_id,
GRAFT_INGRESS_SHARDS)`` (CRC-32 of the client id modulo the shard count; ``graft:{ingress}`` with one
shard), so one client's requests stay in order and many clients spread over the shards.

A tensor larger than ``blob_threshold_bytes`` (256 KiB by default; 0 keeps every tensor inline) goes
to a blob: its bytes are SET at ``graft:blob:<req_id>`` with a TTL of the request's budget plus
``blob_ttl_margin_ms``, before the XADD of its request, so the blob exists when the ingress reads the
request. On a single Redis both are in one pipeline (a pipeline keeps its order on one connection). On
a Redis Cluster the blob lives on its own slot (by ``req_id``, so blobs — most of the bytes — spread
over every master) and a cluster pipeline does not order commands across nodes: the blobs of a flush
are SET in one pipelined round trip and the requests XADDed in the next, once every SET succeeded.
The ingress checks the blob, and the replica that answers deletes it; an unanswered one expires.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from common.contract import keys, wire
from common.contract.errors import GraftError, error_for_code
from common.logs import Event, get_logger
from common.settings import Settings
from common.store.cluster import connection_kwargs, is_cluster
from common.store.connection import TRANSIENT, Backoff, Client, block_below_timeout, connect

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

READ_COUNT = 512
BLOB_THRESHOLD_BYTES = 256 * 1024
BLOB_TTL_MARGIN_MS = 5_000.0


class ClientClosed(RuntimeError):
    """The client was closed while a submit still waited for its reply."""


def as_request_tensor(tensor: npt.NDArray[Any] | torch.Tensor) -> npt.NDArray[np.float32]:
    """A C-contiguous float32 numpy array of ``tensor`` (numpy or torch, any device); no dim is stripped."""
    if not isinstance(tensor, np.ndarray):
        if not hasattr(tensor, "detach"):
            raise TypeError(f"tensor must be a numpy array or a torch tensor, got {type(tensor).__name__}")
        tensor = tensor.detach().cpu().numpy()
    return np.ascontiguousarray(tensor, dtype=np.float32)


def raise_for_reply(reply: wire.Reply) -> npt.NDArray[Any]:
    """The result tensor of an ok reply; the typed ``GraftError`` of an error reply."""
    if reply.ok and reply.tensor is not None:
        return reply.tensor
    err = reply.error
    if err is None:
        raise error_for_code("INTERNAL", "reply carries neither a result nor an error")
    raise error_for_code(err.code, err.message, err.details)


class GraftClient:
    def __init__(self, redis_url: str | None = None, *, redis: Client | None = None, client_id: str | None = None,
                 default_timeout_s: float = 10.0, settings: Settings | None = None,
                 blob_threshold_bytes: int = BLOB_THRESHOLD_BYTES,
                 blob_ttl_margin_ms: float = BLOB_TTL_MARGIN_MS) -> None:
        """``blob_threshold_bytes``: tensors of more bytes travel as blobs (0: never); ``blob_ttl_margin_ms``:
        how long a blob outlives the request's budget (it must cover the wait before the ingress reads it)."""
        self.settings = settings if settings is not None else Settings.from_env()
        self._url = redis_url or self.settings.redis_url
        if redis is None and not self._url:
            raise ValueError("GraftClient needs a redis_url, a redis client, or REDIS_URL in the environment")
        self._redis: Client | None = redis
        self._owns_redis = redis is None
        self.client_id = client_id or f"client-{uuid.uuid4().hex}"
        if not client_id_ok(self.client_id):
            raise ValueError(f"client_id {self.client_id!r} must be 1-256 printable characters without spaces")
        self.default_timeout_s = default_timeout_s
        if blob_threshold_bytes < 0 or blob_ttl_margin_ms < 0:
            raise ValueError("blob_threshold_bytes and blob_ttl_margin_ms must not be negative")
        self.blob_threshold_bytes = blob_threshold_bytes
        self.blob_ttl_margin_ms = blob_ttl_margin_ms
        self.reply_stream = keys.reply_stream(self.client_id)
        self.ingress_stream = keys.client_ingress_stream(self.client_id, self.settings.ingress_shards)
        self._futures: dict[str, asyncio.Future[wire.Reply]] = {}
        # Submits queue their payloads here; one flusher XADDs whatever is queued in one pipeline, so a
        # thousand concurrent submits cost a few round trips and one connection, not a thousand.
        self._outbox: list[tuple[_Outgoing, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._last_id = "0-0"
        self._closed = False

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> GraftClient:
        if self._reader is not None:
            return self
        if self._closed:
            raise ClientClosed("this GraftClient was closed")
        if self._redis is None:
            assert self._url is not None
            # No silent re-send: a submit whose XADD timed out fails, and the caller decides (a retry is a
            # new submission with its own answer, see common/store/replies.py).
            self._redis = connect(self._url, settings=self.settings, client_name=f"graft-{self.client_id}",
                                  retries=0)
        else:
            if connection_kwargs(self._redis).get("decode_responses"):
                raise ValueError("GraftClient needs a redis client with decode_responses=False (tensors are bytes)")
            block_below_timeout(self._redis, self.settings.block_ms)
        # Replies to this id from an earlier session are history: follow the stream from its current end.
        last = await self._conn.xrevrange(self.reply_stream, count=1)
        if last:
            raw_id = last[0][0]
            self._last_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        self._reader = asyncio.create_task(self._read_replies(), name=f"graft-replies-{self.client_id}")
        return self

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(ClientClosed("GraftClient closed before the reply arrived"))
        self._futures.clear()
        if self._owns_redis and self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def _conn(self) -> Client:
        """The Redis connection; ClientClosed before ``start`` or after ``close``."""
        if self._redis is None:
            raise ClientClosed("GraftClient is not started (use `async with` or await start())")
        return self._redis

    async def __aenter__(self) -> GraftClient:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    # ------------------------------------------------------------------------------------ submits

    async def submit_reply(
        self, model: str, cut: int, tensor: npt.NDArray[Any] | torch.Tensor, *, slo_ms: float | None = None,
        budget_ms: float | None = None, device_ms: float | None = None, timeout_s: float | None = None,
        req_id: str | None = None,
    ) -> wire.Reply:
        """Submit one request and return its raw reply (ok or error; with server_ms, epoch, group, batch)."""
        if budget_ms is None and slo_ms is None:
            raise ValueError("give budget_ms (the server's share) or slo_ms (and device_ms)")
        if self._reader is None:
            await self.start()
        if self._reader is not None and self._reader.done():
            self._reader.result()  # surface why replies can no longer be read
        rid = req_id or uuid.uuid4().hex
        if rid in self._futures:
            raise ValueError(f"req_id {rid!r} is already in flight")
        req = wire.Request(req_id=rid, client=self.client_id, model=model, cut=int(cut),
                           tensor=as_request_tensor(tensor), budget_ms=budget_ms, slo_ms=slo_ms, device_ms=device_ms)
        outgoing = self._outgoing(req)
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        fut: asyncio.Future[wire.Reply] = asyncio.get_running_loop().create_future()
        # Registered before the XADD: a fast reply must find its future.
        self._futures[rid] = fut
        try:
            return await asyncio.wait_for(self._send_and_wait(outgoing, fut), timeout)
        except TimeoutError:
            raise TimeoutError(f"no reply to {rid} ({model} cut {cut}) within {timeout}s") from None
        finally:
            self._futures.pop(rid, None)

    def _outgoing(self, req: wire.Request) -> _Outgoing:
        """The request's envelope, and its blob when its tensor is over the threshold."""
        assert req.tensor is not None
        if not self.blob_threshold_bytes or req.tensor.nbytes <= self.blob_threshold_bytes:
            return _Outgoing(wire.encode_request(req))
        meta, data = wire.tensor_bytes(req.tensor)
        req.blob, req.blob_meta = keys.blob(req.req_id), meta
        budget = req.server_budget_ms() or 0.0
        ttl_ms = max(1, math.ceil(max(budget, 0.0) + self.blob_ttl_margin_ms))
        return _Outgoing(wire.encode_request(req), req.blob, data, ttl_ms)

    async def _send_and_wait(self, outgoing: _Outgoing, reply: asyncio.Future[wire.Reply]) -> wire.Reply:
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((outgoing, sent))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await sent
        return await reply

    async def _flush(self) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                blobs_first = is_cluster(self._conn) and any(out.blob is not None for out, _ in batch)
                if blobs_first:  # a cluster pipeline does not order commands across nodes
                    async with self._conn.pipeline(transaction=False) as pipe:
                        for out, _ in batch:
                            if out.blob is not None:
                                pipe.set(out.blob, out.data, px=out.ttl_ms)
                        await pipe.execute()
                async with self._conn.pipeline(transaction=False) as pipe:
                    for out, _ in batch:
                        if out.blob is not None and not blobs_first:  # first the blob, then the request naming it
                            pipe.set(out.blob, out.data, px=out.ttl_ms)
                        # No MAXLEN: a length cap would drop requests nobody has read yet, unanswered;
                        # the ingress trims only what every consumer is done with.
                        pipe.xadd(self.ingress_stream, {keys.FIELD: out.payload})
                    await pipe.execute()
            except Exception as exc:  # every submit of the batch learns why its request was not sent
                for _, sent in batch:
                    if not sent.done():
                        sent.set_exception(exc)
                continue
            for _, sent in batch:
                if not sent.done():
                    sent.set_result(None)

    async def submit(
        self, model: str, cut: int, tensor: npt.NDArray[Any] | torch.Tensor, *, slo_ms: float | None = None,
        budget_ms: float | None = None, device_ms: float | None = None, timeout_s: float | None = None,
        req_id: str | None = None,
    ) -> npt.NDArray[Any]:
        """Submit one request and return the model's output; raises the typed GraftError of an error reply."""
        reply = await self.submit_reply(model, cut, tensor, slo_ms=slo_ms, budget_ms=budget_ms, device_ms=device_ms,
                                        timeout_s=timeout_s, req_id=req_id)
        return raise_for_reply(reply)

    async def submit_many(
        self, model: str, cut: int, tensors: Sequence[npt.NDArray[Any] | torch.Tensor], *,
        slo_ms: float | None = None, budget_ms: float | None = None, device_ms: float | None = None,
        timeout_s: float | None = None,
    ) -> list[npt.NDArray[Any] | GraftError | TimeoutError]:
        """Submit many requests concurrently; each slot holds the output or the error of its request."""
        async def one(t: npt.NDArray[Any] | torch.Tensor) -> npt.NDArray[Any] | GraftError | TimeoutError:
            try:
                return await self.submit(model, cut, t, slo_ms=slo_ms, budget_ms=budget_ms, device_ms=device_ms,
                                         timeout_s=timeout_s)
            except (GraftError, TimeoutError) as exc:
                return exc
        return list(await asyncio.gather(*(one(t) for t in tensors)))

    # ------------------------------------------------------------------------------------- replies

    def _resolve(self, raw: Any) -> None:
        try:
            reply = wire.decode_reply(raw)
        except GraftError as exc:
            log.warning(Event.MALFORMED, stream=self.reply_stream, error=exc.message)
            return
        fut = self._futures.get(reply.req_id)
        if fut is not None and not fut.done():
            fut.set_result(reply)
        # Otherwise a late reply (its submit timed out) or one for another session: dropped.

    async def _read_replies(self) -> None:
        try:
            await self._follow_replies()
        except Exception as exc:  # nothing can resolve the waiting submits any more: fail them now
            log.exception(Event.BATCH_FAILED, stream=self.reply_stream)
            for fut in self._futures.values():
                if not fut.done():
                    fut.set_exception(exc)
            raise

    async def _follow_replies(self) -> None:
        backoff = Backoff()
        block_ms = self.settings.block_ms
        task = asyncio.current_task()
        while not self._closed:
            try:
                resp: Any = await self._conn.xread({self.reply_stream: self._last_id}, count=READ_COUNT, block=block_ms)
                backoff.reset()
                # redis-py 8.1 swallows a cancel that lands in a blocking read (XREAD just returns
                # empty), so honour a pending cancel here or close() would wait forever.
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, stream=self.reply_stream, error=repr(exc), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            rows = ([row for rows in resp.values() for row in rows] if isinstance(resp, dict)
                    else [row for _, rows in resp or [] for row in rows])
            for raw_id, fields in rows:
                self._last_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                self._resolve((fields or {}).get(keys.FIELD))


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """One queued request: its envelope, and the blob to SET before it (key, bytes, TTL) if it has one."""

    payload: bytes
    blob: str | None = None
    data: bytes = b""
    ttl_ms: int = 0


def client_id_ok(value: str) -> bool:
    return 0 < len(value) <= wire.MAX_STR and value.isprintable() and " " not in value

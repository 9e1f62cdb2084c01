"""Graft ingress: validates requests, stamps deadlines, routes them by the current plan, sheds load.

The stream protocol, for producers written in any language
==========================================================

Everything is Redis Streams and msgpack; every stream entry has exactly one field, ``m``, holding a
msgpack map (the *envelope*). Python producers use ``common.client.sdk.GraftClient`` instead.

1. Submitting a request
-----------------------
``XADD graft:{ingress} * m <envelope>`` (you may add ``MAXLEN ~ 100000``) — the braces are part of the
name (a Redis Cluster hash tag). With ``GRAFT_INGRESS_SHARDS`` = N > 1 the ingress reads N streams,
``graft:{ingress}`` (shard 0) and ``graft:{ingress:k}`` for k = 1 .. N-1, and a producer writes all of its
requests to one of them, picked by a stable hash of its client id::

    shard = crc32(utf8(client)) mod N        # CRC-32/IEEE, as zlib.crc32, Java's CRC32, Go's crc32.ChecksumIEEE
    stream = "graft:{ingress}" if shard == 0 else "graft:{ingress:" + str(shard) + "}"

(``common.contract.keys.client_ingress_stream``). Producers must use the same N as the ingress: a
request XADDed to a shard no ingress reads is never answered. On a Redis Cluster
(``GRAFT_REDIS_MODE=cluster``) connect with a cluster client to any node; it sends each key's command
to the master that owns its slot. The envelope::

    {"v": 1, "kind": "request",
     "req_id": str,        # unique per request, 1-256 printable characters, no spaces
     "client": str,        # your client id (same rules); replies go to graft:reply:{client}
     "model": str,         # a model the current plan serves, e.g. "resnet18"
     "cut": int,           # the device ran blocks 0..cut-1; 0 sends the input itself
     "tensor": {"dtype": "float32", "shape": [C, H, W], "data": <bin: raw little-endian bytes, C order>},
     "budget_ms": float,   # server-side budget; or omit it (nil) and give
     "slo_ms": float,      #   the end-to-end SLO and
     "device_ms": float,   #   the time already spent on the device: budget = slo_ms - device_ms
     "blob": str | nil}    # nil: tensor inline; else the key holding the tensor's bytes (see below)

Strings are msgpack ``str``, tensor data is msgpack ``bin``; absent optional fields may be nil. The
tensor is ONE request's tensor, without a batch dimension: its shape must equal the shape the model
produces before block ``cut`` at the served resolution
(``common.model.zoo.describe(model, resolution).cut_shape(cut)``). Only float32 is accepted.
The budget must be finite, > 0 and at most ``GRAFT_MAX_SLO_MS``; the tensor at most
``GRAFT_MAX_TENSOR_BYTES``. ``deadline``/``received`` are set by the ingress; values you send are
overwritten (``deadline = ingress receive time + budget_ms``, on the server's clock).

**Large tensors as blobs.** Instead of inline bytes, a request may reference a *blob*, so the stream
entry stays small (streams keep entries for up to ``GRAFT_MAX_SLO_MS``)::

    SET graft:blob:<req_id> <raw little-endian bytes, C order> PX <budget_ms + margin>
    XADD graft:{ingress} * m {..., "tensor": {"dtype": "float32", "shape": [C, H, W], "data": nil},
                              "blob": "graft:blob:<req_id>"}

in that order. On a single Redis one pipeline is fine (Redis runs it in order). On a Redis Cluster the
blob and the stream are on different masters and a pipeline gives no order across them: wait for the
SET's ``OK``, then XADD. The key must be exactly ``graft:blob:<req_id>`` (no braces) with the request's
own ``req_id``; ``tensor`` carries dtype and shape with
``data`` nil (or absent), and the same rules apply to them as to an inline tensor. The blob must hold
exactly ``prod(shape) * 4`` bytes when the ingress reads the request, so its TTL must cover the wait
in the ingress stream (the SDK uses budget + 5 s). Once it routes the request, the ingress sets the
blob's TTL to ``budget_ms`` + 2 s from then (deadline-based, server clock); the replica that answers
deletes it right after its reply, and a refused request's blob is deleted with the error reply. A
blob that vanished before a replica read it is answered ``DEADLINE_EXCEEDED`` when the deadline has
passed, else ``BAD_TENSOR``.

2. Reading replies
------------------
Every request the ingress can attribute gets exactly one reply on ``graft:reply:{client}``; read it
with ``XREAD BLOCK <ms> STREAMS graft:reply:{client} <last id>`` (start from the stream's last id,
or ``$`` before your first submit). Match replies to requests by ``req_id``; ignore unknown ones
(replies are idempotent, a duplicate never arrives, but a late one may after you gave up)::

    {"v": 1, "kind": "reply", "req_id": str, "ok": bool,
     "tensor": {"dtype", "shape", "data"} | nil,        # the model output when ok (no batch dim)
     "error": {"code": str, "message": str, "details": map} | nil,
     "server_ms": float,                                 # time spent on the server
     "epoch": int | nil, "group": str | nil, "batch": int | nil}

The reply stream expires a day after its last reply and keeps the last 10,000 replies.

3. Error codes
--------------
=================  ===========================================================================
INVALID_REQUEST    envelope not msgpack / wrong version / bad field, budget missing or out of
                   range, message or tensor over the size limit
UNKNOWN_MODEL      model unknown or not served by the current plan
BAD_CUT            cut outside ``0..N-1`` (or not served by the current plan)
BAD_TENSOR         dtype not float32, shape differs from the cut's shape (``details.expected`` /
                   ``details.got``), data length disagrees with the shape, blob key other than
                   ``graft:blob:{req_id}``, blob missing or of the wrong length (``details.key``,
                   ``details.expected`` / ``details.got`` in bytes), both inline data and a blob
DEADLINE_EXCEEDED  the request cannot finish within its budget (sent by workers)
OVERLOADED         the group's backlog would make the request miss its budget; retry after
                   ``details.retry_after_ms`` milliseconds
INTERNAL           a server fault
=================  ===========================================================================

A message without readable ``req_id`` and ``client`` cannot be answered: it is moved to the
dead-letter stream of its shard, ``graft:dead:graft:{ingress}`` (or ``graft:dead:graft:{ingress:k}``; fields ``m``, ``code``, ``message``, ``stream``,
``group``, ``id``, ``deliveries``, ``consumer``, ``time_ms``) and counted in
``graft_requests_total{service="ingress",outcome="MALFORMED"}``.

4. Inside the server (for operators)
------------------------------------
Ingress processes share the consumer group ``ingress`` on every ingress shard (each process reads
every shard: one consumer and one reaper per shard, acking each entry on its own shard); each routes
a batch to ``graft:group:{epoch:gid}`` (consumer group ``workers``) and XADDs per-fragment statistics to
``graft:{stats}`` every second (``kind: "stats"``: ``ingress``, ``ts``, ``window_s``, ``fragments``
of ``{model, cut, count, min_budget_ms, p50_budget_ms}``, ``accepted``, ``rejected`` by code,
``shed``). Heartbeat: ``graft:health:ingress:{name}`` (``python -m services.ingress --check``).
"""

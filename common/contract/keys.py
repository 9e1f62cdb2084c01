"""Every Redis key and stream name Graft uses, in one place. Nobody builds key strings inline.

Names in braces are Redis Cluster *hash tags*: every key whose name shares a tag lives on one slot,
so a Lua script or a MULTI may touch them together (a stream and its dead letters — ``dead_letters``
prefixes the stream's name, so its tag is the stream's; a client's reply stream and its reply ledger;
a registry hash and its liveness index; the plan, its history and the planner lease). Keys with
different tags spread over the masters: each group stream, each ingress shard and each client has its
own. On a single Redis the braces are just characters of the name — a producer writes them literally.

Nothing Graft runs touches two tags in one command, script or MULTI (on a cluster that is a CROSSSLOT
error); where two slots must change together (an entry re-routed from a retired group stream to a
current one, a routed request and the XACK of its ingress entry) the writes are ordered — target
first, then the ack — and a repeat is answered once by the reply ledger.

**Ingress shards.** The ingress stream is ``GRAFT_INGRESS_SHARDS`` streams, ``ingress_stream(k)``:
shard 0 is ``graft:{ingress}`` (``INGRESS``), shard k > 0 ``graft:{ingress:k}``, so on a cluster
producers spread over masters. A producer picks its shard by a stable hash of its client id,
``ingress_shard(client, shards)`` = CRC-32 (IEEE, as zlib/Java/Go compute it) of the id's UTF-8 bytes
modulo the number of shards — all of one client's requests in one stream, in order. Every ingress
process reads every shard (one consumer and one reaper per shard) and acks each entry on its own.

Data plane
    graft:{ingress}                      shard 0 of the ingress: producers XADD requests here (field ``m``)
    graft:{ingress:k}                    shard k of the ingress (k = 1 .. GRAFT_INGRESS_SHARDS - 1)
    graft:group:{E:gid}                  ingress → worker replicas of group ``gid`` of plan epoch ``E``
    graft:reply:{client}                 one reply stream per client (field ``m``), e.g. ``graft:reply:{phone-7}``
    graft:replied:{client}               the client's reply ledger: a sorted set of answered submissions,
                                         scored by when the entry may be forgotten (exactly-once replies)
    graft:blob:<req_id>                  large request tensors (TTL from the deadline); no tag: blobs spread
                                         over every master by request
    graft:dead:<stream>                  dead letters of a stream (poison entries, with the error)

Control plane
    graft:{plan}                         the current plan (msgpack plan envelope)
    graft:{plan}:history                 stream of every published plan
    graft:{plan}:leader                  the planner leader's lease (its instance name, with a TTL)
    graft:{stats}                        ingress → planner fragment statistics (stream)
    graft:{control}                      admin commands to the planner (replan, drain, scale, plan, release)
    graft:registry:{kind}                who is alive: hash, one field per instance of ``kind`` (its status)
    graft:registry:{kind}:seen           sorted set: instance → last heartbeat (ms, Redis clock)
"""

from __future__ import annotations

import zlib

PREFIX = "graft"

INGRESS = f"{PREFIX}:{{ingress}}"
PLAN = f"{PREFIX}:{{plan}}"
PLANS = f"{PREFIX}:{{plan}}:history"
PLANNER_LEASE = f"{PREFIX}:{{plan}}:leader"
STATS = f"{PREFIX}:{{stats}}"
CONTROL = f"{PREFIX}:{{control}}"

# Consumer group names
INGRESS_GROUP = "ingress"
WORKER_GROUP = "workers"
PLANNER_GROUP = "planner"

# Field that carries the msgpack payload in every stream entry.
FIELD = b"m"

# Kinds of processes in the registry.
INGRESS_KIND, PLANNER_KIND, WORKER_KIND, REPLICA_KIND, GATEWAY_KIND = "ingress", "planner", "worker", "replica", "gateway"
KINDS = (INGRESS_KIND, PLANNER_KIND, WORKER_KIND, REPLICA_KIND, GATEWAY_KIND)

_GROUP_HEAD = f"{PREFIX}:group:{{"


def ingress_stream(shard: int = 0) -> str:
    """Shard ``shard`` of the ingress stream: ``graft:{ingress}`` for 0, ``graft:{ingress:k}`` otherwise."""
    if shard < 0:
        raise ValueError(f"ingress shard must not be negative, got {shard}")
    return INGRESS if shard == 0 else f"{PREFIX}:{{ingress:{shard}}}"


def ingress_streams(shards: int) -> list[str]:
    """Every ingress shard's stream, shard 0 first."""
    return [ingress_stream(k) for k in range(max(1, shards))]


def ingress_shard(client: str, shards: int) -> int:
    """The shard a client's requests go to: CRC-32 of its id's UTF-8 bytes modulo ``shards``."""
    return zlib.crc32(client.encode()) % shards if shards > 1 else 0


def client_ingress_stream(client: str, shards: int) -> str:
    return ingress_stream(ingress_shard(client, shards))


def group_stream(epoch: int, gid: str) -> str:
    return f"{_GROUP_HEAD}{epoch}:{gid}}}"


def parse_group_stream(name: str | bytes) -> tuple[int, str] | None:
    """``(epoch, gid)`` of a ``group_stream`` name; None for any other key (a gid may contain ``:``)."""
    text = name.decode() if isinstance(name, bytes) else name
    if not text.startswith(_GROUP_HEAD) or not text.endswith("}"):
        return None
    epoch, sep, gid = text[len(_GROUP_HEAD):-1].partition(":")
    if not sep or not gid or "{" in gid or "}" in gid or not (epoch.isascii() and epoch.isdigit()):
        return None
    return int(epoch), gid


def reply_stream(client: str) -> str:
    return f"{PREFIX}:reply:{{{client}}}"


def reply_ledger(client: str) -> str:
    return f"{PREFIX}:replied:{{{client}}}"


def blob(req_id: str) -> str:
    return f"{PREFIX}:blob:{req_id}"


def dead_letters(stream: str) -> str:
    return f"{PREFIX}:dead:{stream}"


def registry(kind: str) -> str:
    return f"{PREFIX}:registry:{{{kind}}}"


def registry_seen(kind: str) -> str:
    return f"{PREFIX}:registry:{{{kind}}}:seen"


def group_stream_pattern() -> str:
    return f"{_GROUP_HEAD}*"

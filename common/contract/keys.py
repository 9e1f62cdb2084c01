"""Every Redis key and stream name Graft uses, in one place. Nobody builds key strings inline.

Names in braces are Redis Cluster *hash tags*: every key whose name shares a tag lives on one slot,
so a Lua script or a MULTI may touch them together (a group stream and its dead letters; a client's
reply stream and its reply ledger; a registry hash and its liveness index). On a single Redis the
braces are just characters of the name — a producer writes them literally.

Data plane
    graft:ingress                        producers XADD requests here (field ``m``: msgpack envelope)
    graft:group:{E:gid}                  ingress → worker replicas of group ``gid`` of plan epoch ``E``
    graft:reply:{client}                 one reply stream per client (field ``m``), e.g. ``graft:reply:{phone-7}``
    graft:replied:{client}               the client's reply ledger: a sorted set of answered submissions,
                                         scored by when the entry may be forgotten (exactly-once replies)
    graft:blob:{req_id}                  large request tensors (TTL from the deadline)
    graft:dead:<stream>                  dead letters of a stream (poison entries, with the error)

Control plane
    graft:{plan}                         the current plan (msgpack plan envelope)
    graft:{plan}:history                 stream of every published plan
    graft:{plan}:leader                  the planner leader's lease (its instance name, with a TTL)
    graft:stats                          ingress → planner fragment statistics (stream)
    graft:control                        admin commands to the planner (replan, drain, scale, plan, release)
    graft:registry:{kind}                who is alive: hash, one field per instance of ``kind`` (its status)
    graft:registry:{kind}:seen           sorted set: instance → last heartbeat (ms, Redis clock)
"""

from __future__ import annotations

PREFIX = "graft"

INGRESS = f"{PREFIX}:ingress"
PLAN = f"{PREFIX}:{{plan}}"
PLANS = f"{PREFIX}:{{plan}}:history"
PLANNER_LEASE = f"{PREFIX}:{{plan}}:leader"
STATS = f"{PREFIX}:stats"
CONTROL = f"{PREFIX}:control"

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

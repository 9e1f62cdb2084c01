"""Every Redis key and stream name Graft uses, in one place. Nobody builds key strings inline.

Data plane
    graft:ingress                      producers XADD requests here (field ``m``: msgpack envelope)
    graft:group:{epoch}:{gid}          ingress → worker replicas of one group in one plan epoch
    graft:reply:{client}               one reply stream per client (field ``m``)
    graft:blob:{req_id}                large request tensors (TTL from the deadline)
    graft:dead:{stream}                dead letters of a stream (poison entries, with the error)

Control plane
    graft:plan                         the current plan (msgpack, field of a hash: ``epoch``, ``plan``)
    graft:plans                        stream of every published plan (history)
    graft:stats                        ingress → planner fragment statistics (stream)
    graft:control                      admin commands to services (replan, drain, scale)
    graft:health:{service}:{name}      heartbeat keys with TTL
    graft:replied:{req_id}             idempotency marker for replies (short TTL)
"""

from __future__ import annotations

PREFIX = "graft"

INGRESS = f"{PREFIX}:ingress"
PLAN = f"{PREFIX}:plan"
PLANS = f"{PREFIX}:plans"
STATS = f"{PREFIX}:stats"
CONTROL = f"{PREFIX}:control"

# Consumer group names
INGRESS_GROUP = "ingress"
WORKER_GROUP = "workers"
PLANNER_GROUP = "planner"

# Field that carries the msgpack payload in every stream entry.
FIELD = b"m"


def group_stream(epoch: int, gid: str) -> str:
    return f"{PREFIX}:group:{epoch}:{gid}"


def parse_group_stream(name: str | bytes) -> tuple[int, str] | None:
    """``(epoch, gid)`` of a ``group_stream`` name; None for any other key (a gid may contain ``:``)."""
    text = name.decode() if isinstance(name, bytes) else name
    head, sep, rest = text.partition(f"{PREFIX}:group:")
    if head or not sep:
        return None
    epoch, sep, gid = rest.partition(":")
    if not sep or not gid or not (epoch.isascii() and epoch.isdigit()):
        return None
    return int(epoch), gid


def reply_stream(client: str) -> str:
    return f"{PREFIX}:reply:{client}"


def blob(req_id: str) -> str:
    return f"{PREFIX}:blob:{req_id}"


def dead_letters(stream: str) -> str:
    return f"{PREFIX}:dead:{stream}"


def health(service: str, name: str) -> str:
    return f"{PREFIX}:health:{service}:{name}"


def health_pattern(service: str = "*") -> str:
    return f"{PREFIX}:health:{service}:*"


def replied(req_id: str) -> str:
    return f"{PREFIX}:replied:{req_id}"


def group_stream_pattern() -> str:
    return f"{PREFIX}:group:*"

"""Who may do what in Redis: one ACL user per role, exactly the commands and keys that role uses.

The compose files and the Kubernetes manifests declare these users; ``tests/test_acl.py`` runs the
real services, the SDK and the gateway under them against a real Redis (everything works) and tries
what each must not do (refused), and checks that the deployment files say exactly what ``rules``
renders here — this module is the one place the rules live.

Roles
    ingress, planner, worker — the services (a worker's replica processes use the worker's user);
    gateway — the Open Inference Protocol front door: a producer that also follows the plan and beats;
    producer — a trusted raw-Redis or SDK producer: XADD to the ingress shards, its blobs, and reading
        the reply stream of client ids with its own prefix only (``graft:reply:{producer-…}``), so one
        tenant cannot read another's replies; give each tenant its own user and prefix;
    admin — operators and the ``graft`` CLI: everything.

No service user may run administrative or dangerous commands (FLUSHALL, CONFIG, KEYS, CLIENT KILL,
SHUTDOWN, DEBUG, ...); only CLIENT SETNAME (connections name themselves) and INFO are allowed.
Scripts are checked command by command and key by key, like direct calls.
"""

from __future__ import annotations

# Every connection: authenticate, name itself, negotiate the protocol, check liveness, read the clock.
# (redis-py also tries CLIENT SETINFO, Redis 7.2+, and ignores a refusal: it is not granted, so the rules
# load on the Redis 6.2/7.0 of tests too.)
_CONNECTION = ("auth", "hello", "ping", "client|setname", "client|getname", "client|id", "select", "time", "info",
               # a cluster client maps slots to nodes and learns each command's keys
               "cluster|slots", "cluster|nodes", "cluster|info", "command", "readonly")
_SCRIPTS = ("eval", "evalsha", "script|load", "script|exists")
_STREAMS_CONSUME = ("xreadgroup", "xack", "xautoclaim", "xclaim", "xpending", "xgroup|create",
                    "xgroup|createconsumer", "xinfo|groups", "xinfo|stream", "xinfo|consumers", "xlen", "xrange",
                    "xrevrange", "xtrim", "xadd", "xdel")
_TRANSACTIONS = ("multi", "exec", "discard", "watch", "unwatch")

# The commands the registry and reply scripts run inside (checked like direct calls).
_REGISTRY = ("hset", "hget", "hdel", "zadd", "zrem", "zrangebyscore")
_REPLIES = ("zscore", "zadd", "zremrangebyscore", "zrange", "pexpireat", "expire", "xadd")

COMMANDS: dict[str, tuple[str, ...]] = {
    "ingress": (*_CONNECTION, *_SCRIPTS, *_STREAMS_CONSUME, *_TRANSACTIONS, *_REGISTRY, *_REPLIES,
                "get", "strlen", "pexpire", "del", "exists"),
    "planner": (*_CONNECTION, *_SCRIPTS, *_STREAMS_CONSUME, *_TRANSACTIONS, *_REGISTRY, *_REPLIES,
                "get", "set", "pexpire", "del", "exists"),
    "worker": (*_CONNECTION, *_SCRIPTS, *_STREAMS_CONSUME, *_TRANSACTIONS, *_REGISTRY, *_REPLIES,
               "get", "del", "exists", "expire"),
    "gateway": (*_CONNECTION, *_SCRIPTS, *_REGISTRY, "xadd", "xread", "xrevrange", "set", "get"),
    "producer": (*_CONNECTION, "xadd", "xread", "xrevrange", "set"),
}

# Key patterns per role: %R~ read, %W~ write, ~ both.
KEYS: dict[str, tuple[str, ...]] = {
    "ingress": ("~graft:*",),
    "planner": ("~graft:*",),
    "worker": ("~graft:*",),
    "gateway": ("%W~graft:{ingress}", "%W~graft:{ingress:*}", "%W~graft:blob:*", "%R~graft:reply:{gateway-*}",
                "%R~graft:{plan}", "~graft:registry:{gateway}", "~graft:registry:{gateway}:seen"),
    "producer": ("%W~graft:{ingress}", "%W~graft:{ingress:*}", "%W~graft:blob:*", "%R~graft:reply:{producer-*}"),
}

ROLES = (*COMMANDS, "admin")
# Client-id prefixes the SDK must use under each producer-like role (its reply stream is readable only then).
CLIENT_PREFIX = {"gateway": "gateway-", "producer": "producer-"}


def rules(role: str) -> str:
    """The ACL rules of ``role`` after its password: ``resetkeys resetchannels -@all +cmd ... ~pattern ...``."""
    if role == "admin":
        return "~* &* +@all"
    if role not in COMMANDS:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    return " ".join(("-@all", *(f"+{c}" for c in dict.fromkeys(COMMANDS[role])), *KEYS[role]))


def setuser(role: str, password: str) -> list[str]:
    """The ``ACL SETUSER`` arguments that create ``role`` with ``password`` (for tests and tools)."""
    return [role, "reset", "on", f">{password}", *rules(role).split()]

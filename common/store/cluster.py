"""Redis Cluster as Graft's message plane (``GRAFT_REDIS_MODE=cluster``): the client, and what differs.

``connect_cluster`` returns a ``redis.asyncio.cluster.RedisCluster`` (``REDIS_URL`` names any node; the
others are discovered) with the guarantees ``connection.connect`` gives a single Redis: the same socket
timeout above every BLOCK, the same health checks, and retries on connection errors and timeouts only —
a BLOCK below the socket timeout never times out, so a blocked read is never re-sent silently.

Where redis-py's asyncio cluster client needs help:

* **Scripts in pipelines.** ``AsyncScript.__call__`` registers itself for loading only with a
  non-cluster ``Pipeline``; given a ``ClusterPipeline`` it calls ``pipe.evalsha``, which the cluster
  pipeline refuses outright (``RedisClusterException``: EVALSHA is a blocked pipeline command). A raw
  ``EVALSHA`` would be queued, but a ``ClusterPipeline`` never loads scripts: on a node that has not
  seen the script (a fresh, restarted or failed-over master) it answers NOSCRIPT — after the
  pipeline's other commands, on other nodes, already ran. ``queue_script`` queues ``EVAL <body>``
  instead, on every pipeline: whichever node runs it compiles it (and caches it by SHA), so
  NOSCRIPT cannot happen and nothing needs replaying; the few hundred bytes of body per call cost
  nothing next to a reply's payload. (On a single Redis a script registered with a ``Pipeline``
  works, but ``Pipeline.execute`` first sends ``SCRIPT EXISTS`` in a round trip of its own: every
  batch of replies and refusals paid two round trips until 2026-12-04.) Outside pipelines ``AsyncScript`` already recovers from NOSCRIPT
  (SCRIPT LOAD goes to every primary, then EVALSHA again).
* **XREAD/XREADGROUP** have "movable keys", so the cluster client asks a node ``COMMAND GETKEYS``
  before every read — a second round trip per read. ``GraftRedisCluster`` finds the keys after
  ``STREAMS`` itself, and takes the slot of Graft's single-key commands (XADD, XACK, GET, …) from their
  key directly: the generic key parse, run twice per pipelined command, cost ~20 µs of client CPU each.
* **Pipelines are not ordered across nodes**: a ``ClusterPipeline`` sends each node its commands
  concurrently. Writes that must happen in order on different slots (a blob before the request naming
  it, a routed request before the XACK of its ingress entry) are separate round trips in cluster mode
  (``is_cluster``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.settings import Settings

# XREAD [COUNT n] [BLOCK ms] STREAMS k… id…; XREADGROUP GROUP g c [COUNT n] [BLOCK ms] [NOACK] STREAMS …
_READS = {"XREAD": 0, "XREADGROUP": 3}
_OPTION_ARGS = {"COUNT": 1, "BLOCK": 1, "NOACK": 0}
# Commands Graft sends whose syntax has exactly one key, at this position after the command name: their
# slot is that key's, without the generic parse (which the cluster client runs twice per command).
_ONE_KEY = {c: 0 for c in ("XADD", "XACK", "XDEL", "XLEN", "XRANGE", "XREVRANGE", "XPENDING", "XAUTOCLAIM",
                           "XCLAIM", "XTRIM", "GET", "SET", "STRLEN", "PEXPIRE", "EXPIRE", "HSET", "HGET",
                           "HDEL", "ZADD", "ZREM", "ZSCORE")}
_ONE_KEY.update({"XINFO GROUPS": 0, "XINFO STREAM": 0, "XINFO CONSUMERS": 0, "XGROUP CREATE": 0,
                 "XGROUP CREATECONSUMER": 0})


class GraftRedisCluster(RedisCluster):
    """``RedisCluster`` that routes XREAD/XREADGROUP by their stream keys without asking a node first, and
    Graft's single-key commands by their key without the generic key parse."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        at = _ONE_KEY.get(command) if isinstance(command, str) else None
        if at is not None and len(args) > at:
            return self.keyslot(args[at])
        streams = _read_streams(command, args)
        if streams:
            slots = {self.keyslot(k) for k in streams}
            if len(slots) > 1:
                raise RedisClusterException(f"{command} - all keys must map to the same key slot")
            return slots.pop()
        return await super()._determine_slot(command, *args)


def _read_streams(command: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The stream keys of an XREAD/XREADGROUP, parsed by its syntax (() for anything else)."""
    i = _READS.get(str(command).upper(), -1)
    if i < 0:
        return ()
    while i < len(args):
        token = (args[i].decode() if isinstance(args[i], bytes) else str(args[i])).upper()
        if token == "STREAMS":
            rest = args[i + 1:]
            return rest[: len(rest) // 2]
        if token not in _OPTION_ARGS:
            return ()
        i += 1 + _OPTION_ARGS[token]
    return ()


def client_options(settings: Settings, client_name: str | None = None, *, retries: int = 3) -> dict[str, Any]:
    """What every Graft client is made with, a single Redis's or a cluster's: bytes in and out, the
    socket timeouts, health checks, and a retry policy for connection errors and timeouts only.

    ``retries=0`` for a *producer* (the SDK, a load generator): redis-py re-sends the whole command
    after a timeout, and an XADD that timed out may have landed — sent again it is a second submission
    of the request, with its own answer (the fault suite's generator, at 5× overload with Redis stalled
    past the 5 s timeout, got 11,794 requests answered twice that way). A producer learns of the
    timeout instead, and decides. The services' writes are safe to repeat (the reply ledger answers a
    submission once; acks and group entries of a submission are idempotent by its source)."""
    s = settings
    return {"decode_responses": False, "socket_timeout": s.socket_timeout_s,
            "socket_connect_timeout": s.socket_timeout_s,
            "health_check_interval": max(1, int(s.socket_timeout_s * 2)),
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=retries,
                           supported_errors=(RedisConnectionError, RedisTimeoutError)),
            "client_name": client_name}


def connect_cluster(url: str, *, settings: Settings, client_name: str | None = None,
                    retries: int = 3) -> GraftRedisCluster:
    """A cluster client from any node's URL, with ``connection.connect``'s timeouts and retry policy."""
    client: GraftRedisCluster = GraftRedisCluster.from_url(  # type: ignore[assignment]  # from_url: cls(...)
        url, **client_options(settings, client_name, retries=retries))
    return client


def is_cluster(r: object) -> bool:
    """True for a cluster client or one of its pipelines."""
    return isinstance(r, (RedisCluster, ClusterPipeline))


def connection_kwargs(r: object) -> dict[str, Any]:
    """The keyword arguments the client's connections are made with (single Redis or cluster)."""
    if isinstance(r, RedisCluster):
        return dict(r.connection_kwargs)
    pool = getattr(r, "connection_pool", None)
    return dict(getattr(pool, "connection_kwargs", {}) or {})


async def queue_script(pipe: Any, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
    """Queue one call of a registered script (``register_script``) on ``pipe``; nothing runs until it
    executes. The script travels as ``EVAL <body>`` on every pipeline, single Redis or cluster (see
    the module docstring: no NOSCRIPT, no ``SCRIPT EXISTS`` round trip before the pipeline)."""
    pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)

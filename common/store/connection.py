"""Connections to Redis for every service: one way to connect (timeouts, health checks, retries, a single
Redis or a Redis Cluster), the errors that mean "Redis is down for a moment", and the backoff loops use
while it is."""

from __future__ import annotations

import asyncio
import random
import time

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, ClusterError, ResponseError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.contract.errors import StoreUnavailable
from common.settings import Settings
from common.store.cluster import client_options, connect_cluster, connection_kwargs

# A single Redis or a Redis Cluster (GRAFT_REDIS_MODE=cluster): what ``connect`` returns.
Client = Redis | RedisCluster
# A cluster whose slots are moving or whose master failed answers CLUSTERDOWN, or has no node for a
# slot for a moment: transient too.
_CLUSTER_DOWN: tuple[type[Exception], ...] = (ClusterDownError, SlotNotCoveredError, ClusterError)
# Errors after which a loop backs off and reconnects (BusyLoadingError, Redis replaying its AOF after
# a restart, is a ConnectionError subclass).
TRANSIENT: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError, *_CLUSTER_DOWN,
                                          StoreUnavailable)
# What a handler may raise to mean "Redis is down" rather than "this entry failed" (a handler's own
# OSError or builtin TimeoutError is an entry failure: it must count towards dead-lettering).
REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, *_CLUSTER_DOWN, StoreUnavailable)


def connect(url: str, *, settings: Settings | None = None, client_name: str | None = None,
            retries: int = 3) -> Client:
    """An asyncio client with the timeouts, health checks and retries every Graft service uses: a
    ``RedisCluster`` when ``settings.redis_mode`` is ``cluster`` (``url``: any node), else a ``Redis``.
    ``retries=0`` for producers, whose XADD must not be re-sent behind their back (``client_options``)."""
    s = settings if settings is not None else Settings.from_env()
    if s.redis_mode == "cluster":
        return connect_cluster(url, settings=s, client_name=client_name, retries=retries)
    # socket_timeout must exceed the BLOCK of blocking reads (Settings enforces block_ms < timeout):
    # a read still blocked server-side when the socket times out raises TimeoutError, and with a retry
    # policy redis-py then re-sends the XREADGROUP silently — the entries the first call delivered
    # land in our PEL unseen, and every idle read turns into a disconnect/reconnect cycle.
    client: Redis = Redis.from_url(url, **client_options(s, client_name, retries=retries))
    return client


async def wait_for_redis(url: str, timeout: float = 10.0, *, interval: float = 0.05) -> None:
    """Return once Redis at ``url`` answers PING; raise ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        client = Redis.from_url(url, socket_timeout=min(1.0, timeout), socket_connect_timeout=min(1.0, timeout),
                                retry=Retry(NoBackoff(), 0))  # this loop is the retry
        try:
            if await client.ping():
                return
        except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as exc:  # e.g. LOADING
            last = exc
        finally:
            await client.aclose()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Redis at {url} did not answer within {timeout}s: {last!r}")
        await asyncio.sleep(interval)


def block_below_timeout(r: Client, block_ms: int) -> None:
    """Refuse a BLOCK that reaches the client's socket timeout (see ``connect``); a cluster client too."""
    timeout = connection_kwargs(r).get("socket_timeout")
    if block_ms <= 0:
        raise ValueError(f"block_ms must be positive, got {block_ms}")
    if timeout is not None and block_ms / 1000.0 >= float(timeout):
        raise ValueError(
            f"BLOCK {block_ms} ms must stay below the socket timeout ({timeout} s), "
            "or a blocked read times out and is retried silently"
        )


class Backoff:
    """Exponential backoff with full jitter, for loops that wait out a Redis outage."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.base * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0

"""Shared fixtures: one private Redis per test session (never the system one on :6379).

- ``redis_server``: the session's ``RedisServer`` (free port, no persistence), stopped by PID at exit;
- ``redis_url``: its URL;
- ``redis``: a fresh ``redis.asyncio.Redis`` (bytes responses) on a FLUSHALLed server, per test;
- ``redis_cluster``: a real 3-master Redis Cluster (``RedisClusterServer``), started once per session on
  first use and stopped by PID at exit; ``redis_cluster_url``: one node's URL (a cluster client finds
  the others from it);
- every test starts with structlog's defaults: a test that runs a service's ``main`` configures
  logging (level included) for the whole process, which must not leak into the next test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings
from redis.asyncio import Redis

from tools.redis_server import RedisClusterServer, RedisServer

# Property tests judge correctness, not speed: on a loaded 2-core CI machine an example may take longer
# than hypothesis's default 200 ms deadline, and its "too slow" health check would fail a correct test.
settings.register_profile("graft", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("graft")


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=False, socket_timeout=5.0)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    cluster = RedisClusterServer(masters=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: RedisClusterServer) -> str:
    return redis_cluster.url

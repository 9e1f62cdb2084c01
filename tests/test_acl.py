"""Redis ACL users against a real Redis: each role does what it needs (a live system under its own users,
the SDK as a producer, the gateway) and nothing more; the deployment files say what access.py renders."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import pytest_asyncio
import redis
import yaml

from common.client import GraftClient
from common.contract import access, keys
from common.settings import Settings
from common.store.registry import Registry
from tests.gateway_helpers import write_cpu_profile
from tools.redis_server import RedisServer
from tools.up import System, start_system, wait_ready

ROOT = Path(__file__).resolve().parents[1]
MODEL, RES = "resnet18", 32
PASSWORDS = {role: f"pw-{role}" for role in access.ROLES}


def url_for(server: RedisServer, role: str) -> str:
    return f"redis://{role}:{quote(PASSWORDS[role])}@127.0.0.1:{server.port}/0"


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    """A private Redis with every role's user and the default user off."""
    server = RedisServer().start()
    try:
        with redis.Redis(host="127.0.0.1", port=server.port) as r:
            for role in access.ROLES:
                r.execute_command("ACL", "SETUSER", *access.setuser(role, PASSWORDS[role]))
            r.execute_command("ACL", "SETUSER", "default", "off")
        yield server
    finally:
        server.stop()


def client(server: RedisServer, role: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, username=role, password=PASSWORDS[role])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(acl_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    tmp = tmp_path_factory.mktemp("acl")
    profile = write_cpu_profile(tmp / "cpu.json", (MODEL,), RES)
    settings = Settings(redis_url=url_for(acl_redis, "admin"), models=(MODEL,), resolution=RES, device="cpu",
                        log_level="warning", gateway_http_port=0, gateway_grpc_port=0)
    services = ("planner", "ingress", "worker", "gateway")
    system = await start_system(settings, profile, log_dir=tmp / "logs", services=services,
                                service_urls={s: url_for(acl_redis, s) for s in services})
    try:
        await wait_ready(system, timeout=120)
        yield system
    finally:
        await system.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_services_serve_under_their_own_users(system: System, acl_redis: RedisServer) -> None:
    """A NOPERM anywhere in the services' paths (a command or a key their role lacks) shows up here:
    the system would not become ready, or the producer's request would not be answered."""
    x = np.random.default_rng(3).standard_normal((512, 1, 1)).astype(np.float32)
    for threshold in (0, 1):  # inline, then as a blob (SET graft:blob:… before the XADD)
        async with GraftClient(url_for(acl_redis, "producer"), client_id=f"producer-acl-{threshold}",
                               blob_threshold_bytes=threshold) as sdk:
            deadline = time.monotonic() + 60
            while not (rep := await sdk.submit_reply(MODEL, 13, x, budget_ms=10_000.0)).ok:
                assert rep.error is not None and rep.error.code == "OVERLOADED", rep.error
                assert time.monotonic() < deadline, "no replica answered the producer"
                await asyncio.sleep(0.2)
            assert rep.tensor is not None and rep.tensor.shape == (1000,)
    for name, log in ((p.stem, p.read_text()) for p in system.log_dir.iterdir()):
        assert "NOPERM" not in log and "NoPermission" not in log, f"{name} hit an ACL refusal:\n{log[-2000:]}"


@pytest.mark.asyncio(loop_scope="module")
async def test_the_gateway_serves_under_its_user(system: System, acl_redis: RedisServer) -> None:
    import tritonclient.http as httpclient

    admin = client(acl_redis, "admin")
    try:
        [gw] = [s for s in (await _live_gateways(acl_redis)).values()]
    finally:
        admin.close()
    x = np.random.default_rng(4).standard_normal((2, 512, 1, 1)).astype(np.float32)

    def infer() -> Any:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{gw['http_port']}")
        inp = httpclient.InferInput("cut_13", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        return c.infer(MODEL, [inp], parameters={"budget_ms": 10_000.0}).as_numpy("logits")

    out = await asyncio.to_thread(infer)
    assert out.shape == (2, 1000)


async def _live_gateways(server: RedisServer) -> dict[str, dict[str, Any]]:
    from redis.asyncio import Redis

    r = Redis.from_url(url_for(server, "admin"))
    try:
        return await Registry(r, keys.GATEWAY_KIND, 5.0).live()
    finally:
        await r.aclose()


@pytest.mark.parametrize("role", ["ingress", "planner", "worker", "gateway", "producer"])
def test_no_role_but_admin_may_administer(acl_redis: RedisServer, role: str) -> None:
    with client(acl_redis, role) as r:
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"), ("KEYS", "*"),
                        ("CLIENT", "KILL", "ID", "1"), ("CLIENT", "LIST"), ("SHUTDOWN",), ("SAVE",),
                        ("SET", "not-graft", "1"), ("ACL", "LIST"), ("SCRIPT", "FLUSH")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.execute_command(*command)


def test_a_producer_only_queues_requests_and_reads_its_own_replies(acl_redis: RedisServer) -> None:
    with client(acl_redis, "admin") as admin:
        admin.xadd(keys.reply_stream("someone-else"), {"m": b"private"})
        admin.xadd(keys.INGRESS, {"m": b"queued"})
    with client(acl_redis, "producer") as r:
        assert r.xadd(keys.INGRESS, {"m": b"ok"}) and r.xadd(keys.ingress_stream(1), {"m": b"ok"})
        assert r.set(keys.blob("x"), b"\0" * 8, px=1000)
        assert r.xrevrange(keys.reply_stream("producer-7"), count=1) == []
        for command in (("XTRIM", keys.INGRESS, "MAXLEN", "0"),  # would drop everyone's queued requests
                        ("XDEL", keys.INGRESS, "0-1"),
                        ("XRANGE", keys.INGRESS, "-", "+"),  # others' requests
                        ("XREAD", "STREAMS", keys.reply_stream("someone-else"), "0"),  # others' replies
                        ("XREADGROUP", "GROUP", "ingress", "x", "STREAMS", keys.INGRESS, ">"),
                        ("GET", keys.PLAN), ("DEL", keys.blob("x")), ("XADD", keys.reply_stream("producer-7"), "*",
                                                                          "m", "forged"),
                        ("EVAL", "return 1", "0")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.execute_command(*command)


def test_the_gateway_reads_only_gateway_replies(acl_redis: RedisServer) -> None:
    with client(acl_redis, "gateway") as r:
        assert r.xrevrange(keys.reply_stream(f"{access.CLIENT_PREFIX['gateway']}1"), count=1) == []
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.xrevrange(keys.reply_stream("producer-7"), count=1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command("XTRIM", keys.INGRESS, "MAXLEN", "0")


def _compose_rules(path: Path) -> dict[str, str]:
    args = yaml.safe_load(path.read_text())["services"]["redis"]["command"]
    out = {}
    for arg in args:
        m = re.match(r"^(\w+) on >\$\{[A-Z_]+:\?[^}]*\} (.*)$", str(arg))
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_users_are_exactly_access_rules(name: str) -> None:
    got = _compose_rules(ROOT / "deploy" / "compose" / name)
    assert set(got) == {"ingress", "planner", "worker", "gateway", "producer", "admin"}
    assert got == {role: access.rules(role) for role in got}
    command = yaml.safe_load((ROOT / "deploy" / "compose" / name).read_text())["services"]["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags.get("--maxmemory-policy") == "noeviction" and flags.get("--appendonly") == "yes"
    assert "--maxmemory" in command and flags.get("--appendfsync") == "everysec"


def test_kubernetes_users_are_exactly_access_rules() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "base" / "redis.yaml").read_text()))
    [acl] = [d for d in docs if d and d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "graft-redis-acl"]
    assert acl["data"] == {role: access.rules(role) for role in acl["data"]}
    assert set(acl["data"]) >= {"ingress", "planner", "worker", "gateway", "admin"}

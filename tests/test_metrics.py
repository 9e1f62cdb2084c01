"""The health/metrics server binds GRAFT_METRICS_HOST, and every service passes it on."""

from __future__ import annotations

from typing import Any

import pytest

from common.metrics import HealthServer, http_get
from common.settings import Settings
from services import lifecycle
from services.ingress import __main__ as ingress_main
from services.worker import __main__ as worker_main
from services.worker import agent as agent_mod
from services.worker import replica as replica_mod
from services.worker.device import Device


async def _ready() -> bool:
    return True


@pytest.mark.parametrize(("host", "bound"), [(None, "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
async def test_health_server_binds_the_given_host(host: str | None, bound: str) -> None:
    server = HealthServer(_ready) if host is None else HealthServer(_ready, host=host)
    await server.start()
    try:
        assert server.host == bound
        # 0.0.0.0 answers on every interface, loopback included (what a container's own check uses).
        assert await http_get("127.0.0.1", server.port, "/healthz") == (200, b"ok\n")
        assert (await http_get("127.0.0.1", server.port, "/readyz"))[0] == 200
    finally:
        await server.stop()


class _Started(Exception):
    """Raised by the recording server: the test has seen what it needed."""


class _Recorder:
    """Stands in for HealthServer in a service module: records its arguments, then stops the service."""

    calls: list[dict[str, Any]]

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, ready: Any, **kw: Any) -> _Recorder:
        self.calls.append(kw)
        return self

    async def start(self) -> _Recorder:
        raise _Started


class _FakeRedis:
    async def aclose(self) -> None:
        pass

    def register_script(self, _source: str) -> Any:
        async def script(*args: Any, **kw: Any) -> None:
            raise AssertionError("the service must not touch Redis before its health server")
        return script


HOST = "0.0.0.0"


def _settings() -> Settings:
    return Settings(redis_url="redis://127.0.0.1:1/0", metrics_host=HOST, metrics_port=9100, log_level="warning")


def test_run_service_binds_metrics_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # The planner runs through run_service; so does any service that uses the shared lifecycle.
    rec = _Recorder()
    monkeypatch.setattr(lifecycle, "HealthServer", rec)
    monkeypatch.setattr(lifecycle, "connect", lambda *a, **kw: _FakeRedis())
    for key, value in _settings().to_env().items():
        monkeypatch.setenv(key, value)

    async def main(*args: Any) -> None:
        raise AssertionError("the service must not start without its health server")

    with pytest.raises(_Started):
        lifecycle.run_service("planner", main, argv=[], port_offset=1)
    assert rec.calls == [{"host": HOST, "port": 9101}]


@pytest.mark.parametrize(("main", "service", "port"), [
    (ingress_main.main, "ingress", 9100), (worker_main.main, "worker", 9102)])
def test_ingress_and_worker_agent_run_on_the_shared_lifecycle(monkeypatch: pytest.MonkeyPatch, main: Any,
                                                               service: str, port: int) -> None:
    rec = _Recorder()
    monkeypatch.setattr(lifecycle, "HealthServer", rec)
    monkeypatch.setattr(lifecycle, "connect", lambda *a, **kw: _FakeRedis())
    for key, value in _settings().to_env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(_Started):
        main([])
    assert rec.calls == [{"host": HOST, "port": port}]


async def test_worker_agent_and_replica_bind_metrics_host(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(agent_mod, "HealthServer", rec)
    monkeypatch.setattr(replica_mod, "HealthServer", rec)
    with pytest.raises(_Started):
        await agent_mod.Agent(_settings(), [Device("cpu", 0)], name="t", redis=_FakeRedis()).run()
    with pytest.raises(_Started):
        await replica_mod.Replica(_settings(), name="t/0", device="cpu0", model="resnet18", share=1,
                                  redis=_FakeRedis(), metrics_port=9110).run()
    assert rec.calls == [{"host": HOST, "port": 9102}, {"host": HOST, "port": 9110}]

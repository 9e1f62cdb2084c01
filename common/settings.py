"""One settings object, read from the environment (``GRAFT_*`` and ``REDIS_URL``).

| variable | default | meaning |
|---|---|---|
| REDIS_URL | (unset) | Redis to use; unset means ``graft up`` starts an embedded one |
| GRAFT_REDIS_MODE | single | single: one Redis (or a primary with replicas); cluster: a Redis Cluster, ``REDIS_URL`` naming any node (``redis://`` or ``rediss://``, never a unix socket) |
| GRAFT_INGRESS_SHARDS | 1 | ingress streams ``graft:{ingress}``, ``graft:{ingress:1}``, …; a producer writes to shard ``crc32(client id) mod shards`` (``keys.ingress_shard``), every ingress reads them all; producers and ingresses must agree |
| GRAFT_PROFILE | shipped ``cpu`` or ``v100-estimated`` | profile file the planner and workers read |
| GRAFT_MODELS | resnet18,mobilenet_v2 | models served (the bootstrap plan covers every cut of each; later plans the cuts with traffic) |
| GRAFT_RESOLUTION | 0 (each model's default) | input resolution of served models |
| GRAFT_DEVICE | auto | worker device: auto, cpu, cuda |
| GRAFT_NODE | (empty) | this host's name in device names: a worker agent's devices become ``{node}/gpu0``, ``{node}/cpu0``, … (empty: plain ``gpu0``, ``cpu0``, one host); every host of a deployment needs its own |
| GRAFT_RHO | 0.9 | utilisation cap ρ of section 4 |
| GRAFT_POLICY | graft | planning policy of the planner service: graft or per-cut |
| GRAFT_BLOCK_MS | 100 | BLOCK of blocking stream reads (ms); must stay below the socket timeout |
| GRAFT_SOCKET_TIMEOUT_S | 5.0 | redis socket timeout (s) |
| GRAFT_MAX_DELIVERIES | 3 | deliveries before an entry goes to the dead-letter stream |
| GRAFT_MAX_TENSOR_BYTES | 33554432 | largest request tensor accepted by ingress |
| GRAFT_MAX_SLO_MS | 60000 | largest SLO/budget accepted; also the stream trimming age |
| GRAFT_STREAM_MAXLEN | 100000 | approximate length cap of the statistics and dead-letter streams (request streams are never capped: they are trimmed only past what every consumer has finished, older than GRAFT_MAX_SLO_MS) |
| GRAFT_REPLAN_S | 10 | minimum epoch length of the planner (s) |
| GRAFT_DRIFT | 0.25 | relative rate drift that triggers a re-plan |
| GRAFT_BATCHING | eager | eager: an idle replica launches what is queued (work-conserving); slack: hold until the head's slack runs out |
| GRAFT_SWITCH_TIMEOUT_S | 30 | longest the ingress waits for every group stream of a new plan to have a live reader before switching anyway (s) |
| GRAFT_METRICS_PORT | 0 | base Prometheus port (0: pick a free port per service) |
| GRAFT_METRICS_HOST | 127.0.0.1 | address the metrics/health endpoints bind (0.0.0.0: every interface, e.g. in a container) |
| GRAFT_LOG_LEVEL | info | log level |
| GRAFT_LOG_FORMAT | json | json for services, console for the CLI |
| GRAFT_SEED | 0 | seed for random model weights (every process must agree) |
| GRAFT_WEIGHTS_DIR | (unset) | folder with ``<model>.pt`` state dicts (loaded with weights_only=True) |
| GRAFT_STANDBY_REPLICAS | 1 | warm, idle replica processes a worker agent keeps per (device, model, share) in use; one takes over a dead replica's slot in milliseconds |
| GRAFT_SPARE_REPLICAS | 0 | extra serving replicas per group (N+1): a group survives a replica's death without a gap; their share counts in the plan's cost |
| GRAFT_CPU_RESERVE | 0 | cores a CPU plan leaves to the serving path (ingress, Redis, gateway, local producers) when it gives a host's spare cores to extra replicas (0: every core computes). Replicas the load needs are always placed |
| GRAFT_MAX_CPU_PROCESSES | 0 | most replica processes a CPU worker agent runs (0: max(4, 2 × cores)) |
| GRAFT_GATEWAY_HOST | 127.0.0.1 | address the gateway's HTTP and gRPC servers bind (0.0.0.0 in a container) |
| GRAFT_GATEWAY_HTTP_PORT | 8000 | Open Inference Protocol v2 over HTTP/REST (0: a free port) |
| GRAFT_GATEWAY_GRPC_PORT | 8001 | Open Inference Protocol v2 over gRPC (0: a free port) |
| GRAFT_DEFAULT_BUDGET_MS | 1000 | server budget the gateway gives a request that names none |
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

MAX_INGRESS_SHARDS = 256


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used."""


def _split(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


# A host's name in device names (``GRAFT_NODE``): no ``/`` (it separates the node from the device) and no
# ``:`` (it separates the parts of Redis keys that carry device names).
NODE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
_NODE = re.compile(NODE_PATTERN)
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*$")


def _is_host(value: str) -> bool:
    """An IPv4/IPv6 address or a DNS host name (what the health server can bind)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_HOSTNAME.match(value))
    return True


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    redis_mode: str = "single"
    ingress_shards: int = 1
    profile: str | None = None
    models: tuple[str, ...] = ("resnet18", "mobilenet_v2")
    resolution: int = 0
    device: str = "auto"
    node: str = ""
    rho: float = 0.9
    policy: str = "graft"
    block_ms: int = 100
    socket_timeout_s: float = 5.0
    max_deliveries: int = 3
    max_tensor_bytes: int = 32 * 1024 * 1024
    max_slo_ms: float = 60_000.0
    stream_maxlen: int = 100_000
    replan_s: float = 10.0
    drift: float = 0.25
    switch_timeout_s: float = 30.0
    batching: str = "eager"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    log_format: str = "json"
    seed: int = 0
    weights_dir: str | None = None
    standby_replicas: int = 1
    spare_replicas: int = 0
    cpu_reserve: int = 0
    max_cpu_processes: int = 0
    gateway_host: str = "127.0.0.1"
    gateway_http_port: int = 8000
    gateway_grpc_port: int = 8001
    default_budget_ms: float = 1000.0
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.block_ms <= 0 or self.block_ms / 1000.0 >= self.socket_timeout_s:
            raise SettingsError(
                f"GRAFT_BLOCK_MS ({self.block_ms}) must be positive and below the socket timeout "
                f"({self.socket_timeout_s}s), or a blocked read would time out and be retried silently"
            )
        if self.redis_mode not in ("single", "cluster"):
            raise SettingsError(f"GRAFT_REDIS_MODE must be single or cluster, got {self.redis_mode!r}")
        if self.redis_mode == "cluster" and self.redis_url and self.redis_url.startswith("unix"):
            raise SettingsError("GRAFT_REDIS_MODE=cluster needs a redis:// or rediss:// REDIS_URL (a node's address), "
                                f"not a unix socket: {self.redis_url!r}")
        if not 1 <= self.ingress_shards <= MAX_INGRESS_SHARDS:
            raise SettingsError(f"GRAFT_INGRESS_SHARDS must be in 1..{MAX_INGRESS_SHARDS}, got {self.ingress_shards}")
        if not 0 < self.rho <= 1:
            raise SettingsError(f"GRAFT_RHO must be in (0, 1], got {self.rho}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"GRAFT_DEVICE must be auto, cpu or cuda, got {self.device!r}")
        if self.node and not _NODE.fullmatch(self.node):
            raise SettingsError(f"GRAFT_NODE must be empty or a name of letters, digits, '_', '.' and '-' (at most 63, "
                                f"not starting with '_', '.' or '-'), got {self.node!r}")
        if self.policy not in ("graft", "per-cut"):
            raise SettingsError(f"GRAFT_POLICY must be graft or per-cut, got {self.policy!r}")
        if self.batching not in ("eager", "slack"):
            raise SettingsError(f"GRAFT_BATCHING must be eager or slack, got {self.batching!r}")
        if self.cpu_reserve < 0:
            raise SettingsError(f"GRAFT_CPU_RESERVE must be at least 0, got {self.cpu_reserve}")
        if self.max_deliveries < 1:
            raise SettingsError("GRAFT_MAX_DELIVERIES must be at least 1")
        for name, host in (("GRAFT_METRICS_HOST", self.metrics_host), ("GRAFT_GATEWAY_HOST", self.gateway_host)):
            if not _is_host(host):
                raise SettingsError(f"{name} must be an IP address or a host name (127.0.0.1, 0.0.0.0, ::), "
                                    f"got {host!r}")
        if not 0 < self.default_budget_ms <= self.max_slo_ms:
            raise SettingsError(f"GRAFT_DEFAULT_BUDGET_MS must be in (0, GRAFT_MAX_SLO_MS], got {self.default_budget_ms}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        if env.get("REDIS_URL"):
            kw["redis_url"] = env["REDIS_URL"]
        for f in fields(cls):
            if f.name in ("redis_url", "extra"):
                continue
            key = f"GRAFT_{f.name.upper()}"
            if key not in env or env[key] == "":
                continue
            raw = env[key]
            try:
                if f.name == "models":
                    kw[f.name] = _split(raw)
                elif f.type in ("int",):
                    kw[f.name] = int(raw)
                elif f.type in ("float",):
                    kw[f.name] = float(raw)
                else:
                    kw[f.name] = raw
            except ValueError:
                raise SettingsError(f"{key}={raw!r} is not a valid {f.type}") from None
        kw.update(overrides)
        return cls(**kw)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """Environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        for f in fields(self):
            if f.name in ("redis_url", "extra"):
                continue
            val = getattr(self, f.name)
            if val is None:
                continue
            env[f"GRAFT_{f.name.upper()}"] = ",".join(val) if isinstance(val, tuple) else str(val)
        return env

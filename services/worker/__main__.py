"""``python -m services.worker [--devices auto|cpu0|gpu0,gpu1] [--name N] [--check]``: the worker agent.

``--check`` exits 0 iff this agent's heartbeat key is fresh (for container health checks), else 1.
With ``GRAFT_NODE`` set, the devices are named on that node (``node/gpu0``, …) wherever they appear.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog

from common.contract import keys
from common.logs import configure
from common.settings import Settings, SettingsError
from common.store.streams import TRANSIENT, connect
from services.worker.agent import Agent, default_name
from services.worker.device import DeviceError, discover

log = structlog.get_logger("worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.worker", description="Graft worker agent")
    p.add_argument("--devices", default=None,
                   help="auto (NVML, else cpu0), cpu, cuda, or a list like gpu0,gpu1 / cpu0 (default: GRAFT_DEVICE); "
                        "with GRAFT_NODE=a they are named a/gpu0, …")
    p.add_argument("--name", default=None, help="agent name in heartbeats (default: host-devices)")
    p.add_argument("--check", action="store_true", help="exit 0 iff a fresh heartbeat of this agent exists")
    return p.parse_args(argv)


async def check(settings: Settings, name: str) -> int:
    if not settings.redis_url:
        print("REDIS_URL is not set", file=sys.stderr)
        return 1
    r = connect(settings.redis_url, settings=settings)
    try:
        alive = bool(await r.exists(keys.health("worker", name)))
    except TRANSIENT as exc:
        print(f"cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    finally:
        await r.aclose()
    print(f"worker {name}: {'alive' if alive else 'no fresh heartbeat'}")
    return 0 if alive else 1


async def serve(agent: Agent) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    return await agent.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"bad settings: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_format, settings.log_level)
    spec = args.devices or settings.device
    try:
        found = discover(spec, node=settings.node)
    except DeviceError as exc:
        log.error("bad_devices", devices=spec, error=str(exc))
        return 2
    name = args.name or default_name(found.devices)
    if args.check:
        return asyncio.run(check(settings, name))
    log.info("devices", devices=[d.name for d in found.devices], node=settings.node, gpus=found.gpu_count,
             mps=found.mps, note=found.note)
    if any(d.is_gpu for d in found.devices) and not found.mps:
        log.warning("mps_not_running", devices=[d.name for d in found.devices],
                    consequence="GPU shares (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) are NOT enforced: every replica "
                                "gets the whole GPU and time-slices; start nvidia-cuda-mps-control -d")
    # A CPU host found by auto/cpu serves every cpu device of the plan: on a CPU profile a "device" is
    # the thread budget the profile was measured with, and this host runs them all. Hosts that share
    # the CPU work name their devices explicitly (--devices cpu0,cpu1).
    whole_cpu = spec.strip() in ("auto", "cpu", "") and not any(d.is_gpu for d in found.devices)
    agent = Agent(settings, found.devices, name=name, mps=found.mps, all_cpu_devices=whole_cpu)
    return asyncio.run(serve(agent))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m services.worker [--devices auto|cpu0|gpu0,gpu1] [--name N] [--check]``: the worker agent.

``--check`` exits 0 iff this agent (``--name``, else one on this host) is alive in the registry.
With ``GRAFT_NODE`` set, the devices are named on that node (``node/gpu0``, …) wherever they appear.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from common.contract import keys
from common.settings import Settings
from common.store.connection import Client
from services.lifecycle import Heartbeat, run_service
from services.worker.agent import WORKER_PORT_OFFSET, Agent
from services.worker.device import DeviceError, discover

log = structlog.get_logger("worker")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default=None,
                   help="auto (NVML, else cpu0), cpu, cuda, or a list like gpu0,gpu1 / cpu0 (default: GRAFT_DEVICE); "
                        "with GRAFT_NODE=a they are named a/gpu0, …")


async def serve(settings: Settings, r: Client, stop: asyncio.Event, hb: Heartbeat) -> None:
    spec = settings.extra.get("devices") or settings.device
    if spec in ("None", ""):
        spec = settings.device
    try:
        found = discover(spec, node=settings.node)
    except DeviceError as exc:
        log.error("bad_devices", devices=spec, error=str(exc))
        raise SystemExit(2) from None
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
    agent = Agent(settings, found.devices, name=hb.name, redis=r, mps=found.mps, all_cpu_devices=whole_cpu,
                  heartbeat=hb)
    await agent.run(stop)


def main(argv: list[str] | None = None) -> int:
    return run_service(keys.WORKER_KIND, serve, argv, extra_args=_args, port_offset=WORKER_PORT_OFFSET)


if __name__ == "__main__":
    sys.exit(main())

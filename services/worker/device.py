"""The devices a worker agent serves, and the environment that gives a replica its share.

Devices are named as the plan names them: ``gpu0``, ``gpu1``, … on GPU hosts and ``cpu0`` on a CPU host,
or, when the host has a node name (``GRAFT_NODE``, needed once several hosts serve one plan),
``{node}/gpu0``, ``{node}/cpu0``, …. The part after the slash is local to the host: ``gpuN`` is the
host's GPU N (its CUDA/NVML index), whatever the node.
A replica's share must be fixed *before* CUDA initialises in its process (MPS reads
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` once, when the context is created), which is why every replica is
its own child process and its share travels in the environment, never through an API call.

Discovery (``--devices auto``) asks NVML how many GPUs the host has; without a driver, without
``pynvml`` or without a GPU it degrades to ``cpu0``. Shares on a GPU without an MPS control daemon are
not enforced (every process gets the whole GPU), so the agent warns loudly in that case.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.settings import NODE_PATTERN

_NAME = re.compile(rf"^(?:({NODE_PATTERN})/)?(gpu|cpu)(\d+)$")
_NODE = re.compile(NODE_PATTERN)
MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"


class DeviceError(ValueError):
    """A device list cannot be parsed or names a device this host does not have."""


@dataclass(frozen=True, slots=True)
class Device:
    kind: str  # "gpu" or "cpu"
    index: int  # on this host: a GPU's CUDA/NVML index
    node: str = ""  # the host's GRAFT_NODE ("" on a one-host deployment)

    @property
    def local_name(self) -> str:
        """``gpu1``: the name on its host, without the node."""
        return f"{self.kind}{self.index}"

    @property
    def name(self) -> str:
        """The name the plan uses: ``node/gpu1``, or ``gpu1`` without a node."""
        return f"{self.node}/{self.local_name}" if self.node else self.local_name

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    @property
    def torch_device(self) -> str:
        # The agent narrows CUDA_VISIBLE_DEVICES to this one GPU, so inside the replica it is always cuda:0.
        return "cuda" if self.is_gpu else "cpu"

    @classmethod
    def parse(cls, name: str) -> Device:
        """``gpu1``, ``cpu0``, ``node/gpu1`` or ``node/cpu0``."""
        m = _NAME.match(name.strip())
        if m is None:
            raise DeviceError(f"device {name!r} is not of the form gpuN, cpuN, NODE/gpuN or NODE/cpuN")
        return cls(m.group(2), int(m.group(3)), m.group(1) or "")

    def on(self, node: str) -> Device:
        """This device named on ``node`` (a device named on another node is refused)."""
        if self.node and self.node != node:
            raise DeviceError(f"device {self.name} is on node {self.node!r}, but this host's GRAFT_NODE is "
                              f"{node or '(empty)'!r}")
        return Device(self.kind, self.index, node)


@dataclass(frozen=True, slots=True)
class Discovery:
    devices: tuple[Device, ...]
    gpu_count: int
    mps: bool  # an MPS control daemon answers on this host
    note: str  # why discovery ended where it did (logged by the agent)


def nvml_gpu_count() -> tuple[int, str]:
    """Number of GPUs NVML sees, and a note on why it is zero when it is."""
    try:
        import pynvml
    except ImportError:
        return 0, "pynvml is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses per cause; any of them means "no usable driver"
        return 0, f"NVML is unavailable: {exc}"
    try:
        return int(pynvml.nvmlDeviceGetCount()), "NVML"
    except Exception as exc:
        return 0, f"NVML could not count devices: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def mps_running(env: Mapping[str, str] | None = None) -> bool:
    """Whether an MPS control daemon is reachable: its control pipe exists where clients look for it."""
    env = os.environ if env is None else env
    pipe_dir = Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DEFAULT)
    return (pipe_dir / "control").exists()


def discover(spec: str = "auto", *, gpu_count: int | None = None,
             env: Mapping[str, str] | None = None, node: str = "") -> Discovery:
    """Resolve ``--devices``: ``auto``, ``cpu``, ``cuda`` (every GPU) or a list like ``gpu0,gpu1`` / ``cpu0``.

    ``gpu_count`` overrides the NVML probe (tests; hosts where NVML lies inside a container). ``node``
    (``GRAFT_NODE``) qualifies every device name: ``node/gpu0``; a list may name devices either way,
    but never on another node.
    """
    if node and not _NODE.fullmatch(node):
        raise DeviceError(f"node name {node!r} is not valid (letters, digits, '_', '.', '-'; no '/')")
    spec = spec.strip() or "auto"
    note = "given"
    if gpu_count is None and (spec in ("auto", "cuda") or "gpu" in spec):
        gpu_count, note = nvml_gpu_count()
    count = gpu_count or 0
    mps = mps_running(env) if count else False
    if spec == "cpu":
        return Discovery((Device("cpu", 0, node),), count, mps, "cpu requested")
    if spec in ("auto", "cuda"):
        if count:
            return Discovery(tuple(Device("gpu", i, node) for i in range(count)), count, mps, note)
        if spec == "cuda":
            raise DeviceError(f"--devices cuda, but no GPU is usable ({note})")
        return Discovery((Device("cpu", 0, node),), 0, False, f"no GPU ({note}); serving on the CPU")
    devices = tuple(Device.parse(n).on(node) for n in spec.split(",") if n.strip())
    if not devices:
        raise DeviceError("--devices names no device")
    if len({d.name for d in devices}) != len(devices):
        raise DeviceError(f"--devices lists a device twice: {spec!r}")
    for d in devices:
        if d.is_gpu and d.index >= count:
            raise DeviceError(f"{d.name} is not on this host ({count} GPU(s) found: {note})")
    return Discovery(devices, count, mps, note)


def share_env(device: Device, share: int, base: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The environment of a replica process on ``device`` with ``share`` (GPU percent or CPU threads)."""
    if share < 1:
        raise DeviceError(f"share must be at least 1, got {share}")
    env = dict(os.environ if base is None else base)
    if device.is_gpu:
        if share > 100:
            raise DeviceError(f"a GPU share is a percentage (1..100), got {share}")
        # NVML numbers GPUs by PCI bus id; CUDA's default order (fastest first) may differ.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = str(device.index)
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(share)
        # Many replicas share a host's cores; host-side ops of a GPU replica need no thread pool.
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        # An empty list hides every GPU, so a CPU replica can never grab one by accident.
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
        env["OMP_NUM_THREADS"] = str(share)
        env["MKL_NUM_THREADS"] = str(share)
    return env


def default_agent_name(devices: Sequence[Device]) -> str:
    """A worker agent's name when none is given: the host and the devices it serves."""
    return f"{socket.gethostname()}-{'+'.join(d.name for d in devices)}"


def cpu_device_of(name: str, node: str) -> Device | None:
    """The CPU device a plan's device name denotes on ``node`` ("all CPU devices" mode adopts it), else None."""
    try:
        d = Device.parse(name)
    except DeviceError:
        return None
    return d if d.kind == "cpu" and d.node == node and d.name == name else None

"""One replica process: started with its share in its environment, fed assignments, watched, stopped.

The agent owns one ``ReplicaProcess`` per child. A child is started for a device, a model and a share
(``device.share_env``: MPS thread percentage on a GPU, fixed for the life of the process; threads on a
CPU, which an assignment may change), loads the model once and then serves whatever slots the agent
assigns it over its stdin (``control.py``). Its stdin pipe is its lifeline: the agent's death closes
it, and the child stops. Exits are noticed at once (a waiter task per child sets ``exited``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.lifecycle import child_env, pdeathsig_preexec
from services.worker.control import STOP, Assignment, encode
from services.worker.device import Device, share_env

# Exit codes of a replica process: 0 stopped (final), 1 crashed, 2 its model or device cannot be served.
EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2

# A replica heartbeats in the registry every HEARTBEAT_S and counts as gone REPLICA_TTL_S after its last
# beat. Here, not in replica.py, so that the agent knows them without importing torch.
HEARTBEAT_S = 0.5
REPLICA_TTL_S = 2.0

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0
CONFIG_BACKOFF_MAX_S = 60.0  # exit 2: a restart will not help; try again rarely (a GPU may come back)
STABLE_S = 30.0


@dataclass
class ReplicaProcess:
    """A child process for ``model`` on ``device`` at ``share``; ``name`` is its registry name."""

    name: str
    device: Device
    model: str
    share: int
    env: Mapping[str, str]
    python: str = sys.executable
    metrics_port: int = 0
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    assignment: Assignment | None = None
    seq: int = 0
    exit_code: int | None = None
    loaded: bool = False  # the agent saw it in the registry (standby or serving)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    _waiter: asyncio.Task[None] | None = None

    def argv(self) -> list[str]:
        return [self.python, "-m", "services.worker.replica", "--name", self.name, "--device", self.device.name,
                "--model", self.model, "--share", str(self.share), "--metrics-port", str(self.metrics_port)]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive and self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        env = child_env(share_env(self.device, self.share, self.env))
        # The death signal is set before exec: a child still importing torch dies with the agent too.
        self.proc = await asyncio.create_subprocess_exec(*self.argv(), env=env, stdin=asyncio.subprocess.PIPE,
                                                         preexec_fn=pdeathsig_preexec())
        self.started_at = time.monotonic()
        self.exited.clear()
        self._waiter = asyncio.create_task(self._wait(self.proc), name=f"wait-{self.name}")

    async def _wait(self, proc: asyncio.subprocess.Process) -> None:
        self.exit_code = await proc.wait()
        self.exited.set()

    async def assign(self, assignment: Assignment) -> bool:
        """Send ``assignment`` (its ``seq`` is set here); False when the child is gone."""
        self.seq += 1
        assignment = Assignment(self.seq, assignment.consumer, assignment.share, assignment.active,
                                assignment.streams, assignment.latency_scale)
        self.assignment = assignment
        return await self._send(assignment.to_wire())

    async def _send(self, message: Mapping[str, Any]) -> bool:
        if not self.alive or self.proc is None or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write(encode(message))
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False
        return True

    async def stop(self) -> None:
        """Ask the child to finish what it holds and exit (it also stops on end-of-file). One that has not
        loaded yet also gets SIGTERM: it may still be importing, seconds before it reads its stdin, and it
        holds nothing to finish."""
        if not await self._send(STOP) or not self.loaded:
            self.signal(signal.SIGTERM)

    def signal(self, sig: int) -> None:
        if self.alive and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def describe(self) -> dict[str, Any]:
        a = self.assignment
        return {"name": self.name, "device": self.device.name, "model": self.model, "share": self.share,
                "pid": self.pid, "consumer": None if a is None else a.consumer,
                "group": None if a is None or a.active is None else a.active.group,
                "epoch": None if a is None or a.active is None else a.active.epoch,
                "streams": [] if a is None else list(a.streams), "exit_code": self.exit_code}


async def terminate_all(procs: Sequence[ReplicaProcess], grace_s: float) -> None:
    """Stop every live process, wait up to ``grace_s`` in total, then SIGKILL what is left."""
    live = [p for p in procs if p.alive]
    for p in live:
        await p.stop()
    if not live:
        return
    waits = [asyncio.ensure_future(p.exited.wait()) for p in live]
    _done, pending = await asyncio.wait(waits, timeout=grace_s)
    if pending:
        for p in live:
            p.signal(signal.SIGKILL)
        await asyncio.wait(pending, timeout=grace_s)


async def cancel_tasks(tasks: Sequence[asyncio.Task[Any]], *, attempts: int = 5, wait_s: float = 1.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again when a cancellation was lost.

    On Python 3.11 ``asyncio.wait_for`` can swallow a cancel that races with its inner future, and
    redis-py's connect path uses it: a heartbeat cancelled while (re)connecting may keep running.
    """
    pending = {t for t in tasks if not t.done()}
    for _ in range(attempts):
        if not pending:
            break
        for t in pending:
            t.cancel()
        _done, pending = await asyncio.wait(pending, timeout=wait_s)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: a helper's failure was already logged where it happened


class Backoff:
    """Delays before the next process of a kind whose processes keep dying: fast at first, capped, reset
    after a stable run. An exit 2 (``EXIT_CONFIG``: the model or device cannot be served here) waits at
    least ``BACKOFF_MAX_S`` and doubles up to ``CONFIG_BACKOFF_MAX_S``: each try costs a process start
    (seconds of CPU to import torch) and cannot succeed until something outside changes."""

    def __init__(self) -> None:
        self.delay = BACKOFF_START_S

    def next(self, ran_s: float, exit_code: int | None = None) -> float:
        if exit_code == EXIT_CONFIG:
            self.delay, cap = max(self.delay, BACKOFF_MAX_S), CONFIG_BACKOFF_MAX_S
        else:
            if ran_s >= STABLE_S:
                self.delay = BACKOFF_START_S
            self.delay, cap = min(self.delay, BACKOFF_MAX_S), BACKOFF_MAX_S
        delay = self.delay
        self.delay = min(cap, self.delay * 2)
        return delay

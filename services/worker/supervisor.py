"""One replica child process: how it is started, watched, restarted with backoff and stopped.

The agent owns one ``ReplicaProcess`` per placement it serves. A replica process is started with its
share already in its environment (``device.share_env``), so CUDA/MPS or the CPU thread pool is sized
before anything initialises. A crash is restarted after an exponential backoff that resets once a
process has stayed up for ``STABLE_S``; a clean exit (0) means the replica drained its retired group
or was asked to stop, and is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.worker.device import Device, share_env

# Exit codes of a replica process: 0 drained or stopped (final), 2 its epoch/group/model cannot be served.
EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_S = 30.0


class State(StrEnum):
    STARTING = "starting"  # spawned; its own heartbeat is not required to call it that
    RUNNING = "running"
    DRAINING = "draining"  # its group left the plan; it exits by itself once its stream is drained
    BACKOFF = "backoff"  # crashed; waiting to be restarted
    EXITED = "exited"  # final


@dataclass(frozen=True, slots=True)
class ReplicaSlot:
    """Which replica this is: stable across restarts, so it keeps its consumer name and pending entries."""

    epoch: int
    group: str
    device: Device
    index: int
    share: int

    @property
    def consumer(self) -> str:
        return f"{self.device.name}-{self.group}-{self.index}"

    def argv(self, python: str = sys.executable, metrics_port: int = 0) -> list[str]:
        return [python, "-m", "services.worker.replica", "--epoch", str(self.epoch), "--group", self.group,
                "--device", self.device.name, "--index", str(self.index), "--share", str(self.share),
                "--metrics-port", str(metrics_port)]


@dataclass
class ReplicaProcess:
    slot: ReplicaSlot
    env: Mapping[str, str]
    python: str = sys.executable
    metrics_port: int = 0
    state: State = State.STARTING
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0
    retry_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    history: list[int] = field(default_factory=list)  # exit codes, oldest first

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        env = share_env(self.slot.device, self.slot.share, self.env)
        self.proc = await asyncio.create_subprocess_exec(
            *self.slot.argv(self.python, self.metrics_port), env=env, stdin=asyncio.subprocess.DEVNULL,
        )
        self.started_at = time.monotonic()
        if self.state != State.DRAINING:
            self.state = State.RUNNING

    def poll_exit(self) -> int | None:
        """The exit code if the process ended since the last poll (then it is recorded), else None."""
        if self.proc is None or self.proc.returncode is None:
            return None
        code = self.proc.returncode
        self.proc = None
        self.last_exit = code
        self.history.append(code)
        del self.history[:-20]
        return code

    def schedule_restart(self, now: float) -> float:
        """Enter backoff; returns the delay. A process that ran stably restarts fast again."""
        if self.last_exit == EXIT_CONFIG:
            self.backoff_s = BACKOFF_MAX_S  # a restart cannot fix a plan it cannot serve; keep trying slowly
        elif now - self.started_at >= STABLE_S:
            self.backoff_s = BACKOFF_START_S
        delay = self.backoff_s
        self.backoff_s = min(BACKOFF_MAX_S, self.backoff_s * 2)
        self.retry_at = now + delay
        if self.state != State.DRAINING:
            self.state = State.BACKOFF
        return delay

    def due(self, now: float) -> bool:
        return self.proc is None and self.state in (State.BACKOFF, State.DRAINING) and now >= self.retry_at

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def describe(self) -> dict[str, Any]:
        s = self.slot
        return {"consumer": s.consumer, "epoch": s.epoch, "group": s.group, "device": s.device.name,
                "index": s.index, "share": s.share, "pid": self.pid, "state": str(self.state),
                "restarts": self.restarts, "last_exit": self.last_exit}


async def terminate_all(procs: Sequence[ReplicaProcess], grace_s: float) -> None:
    """SIGTERM every live process, wait up to ``grace_s`` in total, then SIGKILL what is left."""
    live = [p for p in procs if p.alive]
    for p in live:
        p.signal(signal.SIGTERM)
    waits = [p.proc.wait() for p in live if p.proc is not None]
    if not waits:
        return
    _done, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=grace_s)
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


"""Process supervision for ``graft up``: start services as children, restart crashes, stop on signal.

Each child is ``python -m services.<name>`` with the settings passed through the environment. A child
that exits while the supervisor is running is restarted with exponential backoff (reset after it has
stayed up for a while); on stop every child gets SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common.logs import Event, get_logger

log = get_logger("graft.up")


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ChildState:
    spec: ChildSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0


def service_argv(name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"services.{name}", *extra]


class Supervisor:
    def __init__(self, specs: list[ChildSpec], *, base_env: Mapping[str, str] | None = None,
                 log_dir: Path | None = None, grace_s: float = 10.0, max_backoff_s: float = 10.0) -> None:
        self.children = {s.name: ChildState(s) for s in specs}
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._log_dir = log_dir
        self._grace_s = grace_s
        self._max_backoff_s = max_backoff_s
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._files: list[IO[bytes]] = []

    async def start(self) -> None:
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        for state in self.children.values():
            self._tasks.append(asyncio.create_task(self._keep_running(state), name=f"child-{state.spec.name}"))

    def log_path(self, name: str) -> Path | None:
        return None if self._log_dir is None else self._log_dir / f"{name}.log"

    async def _spawn(self, state: ChildState) -> asyncio.subprocess.Process:
        env = {**self._base_env, **state.spec.env}
        out: int | IO[bytes] | None = None
        path = self.log_path(state.spec.name)
        if path is not None:
            fh = path.open("ab")
            self._files.append(fh)
            out = fh
        proc = await asyncio.create_subprocess_exec(*state.spec.argv, env=env, stdout=out, stderr=out,
                                                    start_new_session=True)
        state.proc, state.started_at = proc, time.monotonic()
        return proc

    async def _keep_running(self, state: ChildState) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            proc = await self._spawn(state)
            code = await proc.wait()
            state.last_exit = code
            if self._stopping.is_set():
                return
            up_for = time.monotonic() - state.started_at
            backoff = 0.5 if up_for > 30 else min(backoff * 2, self._max_backoff_s)
            state.restarts += 1
            log.warning(Event.REPLICA_EXITED, child=state.spec.name, code=code, restart_in_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)

    async def stop(self) -> None:
        self._stopping.set()
        procs = [s.proc for s in self.children.values() if s.proc is not None and s.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if procs:
            _done, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=self._grace_s)
            if pending:
                for p in procs:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(p.pid, signal.SIGKILL)
                await asyncio.wait(pending, timeout=5)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fh in self._files:
            fh.close()

    def status(self) -> dict[str, dict[str, object]]:
        return {
            name: {"pid": s.proc.pid if s.proc else None,
                   "running": bool(s.proc and s.proc.returncode is None),
                   "restarts": s.restarts, "last_exit": s.last_exit}
            for name, s in self.children.items()
        }

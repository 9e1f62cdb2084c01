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
from services.lifecycle import child_env, pdeathsig_preexec

log = get_logger("graft.up")

BACKOFF_START_S = 0.5
STABLE_S = 30.0  # a child up this long restarts fast again after a crash


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

    async def start(self) -> None:
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        for state in self.children.values():
            self._tasks.append(asyncio.create_task(self._keep_running(state), name=f"child-{state.spec.name}"))

    def log_path(self, name: str) -> Path | None:
        return None if self._log_dir is None else self._log_dir / f"{name}.log"

    async def _spawn(self, state: ChildState) -> asyncio.subprocess.Process:
        # Every child gets SIGTERM from the kernel when graft up dies, however it dies, from before its exec
        # (services.lifecycle.pdeathsig_preexec): one still importing when graft up is killed dies too.
        env = child_env({**self._base_env, **state.spec.env})
        path = self.log_path(state.spec.name)
        # The child gets its own copy of the log file's descriptor: ours is closed at once, so a child
        # that crash-loops does not leak one open file per restart.
        with path.open("ab") if path is not None else contextlib.nullcontext() as fh:
            out: IO[bytes] | None = fh
            proc = await asyncio.create_subprocess_exec(*state.spec.argv, env=env, stdout=out, stderr=out,
                                                        stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                                                        preexec_fn=pdeathsig_preexec())
        state.proc, state.started_at = proc, time.monotonic()
        return proc

    async def _keep_running(self, state: ChildState) -> None:
        backoff = min(BACKOFF_START_S, self._max_backoff_s)
        while not self._stopping.is_set():
            try:
                proc = await self._spawn(state)
            except OSError as exc:  # e.g. the executable is missing: count it as a crash, keep trying
                state.proc, state.started_at, state.last_exit = None, time.monotonic(), None
                error: str | None = str(exc)
                code: int | None = None
            else:
                if self._stopping.is_set():  # stop() ran while we were spawning: it did not see this child
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                code = await proc.wait()
                state.last_exit, error = code, None
            if self._stopping.is_set():
                return
            if time.monotonic() - state.started_at > STABLE_S:
                backoff = min(BACKOFF_START_S, self._max_backoff_s)
            delay, backoff = backoff, min(backoff * 2, self._max_backoff_s)
            state.restarts += 1
            log.warning(Event.REPLICA_EXITED, child=state.spec.name, code=code, error=error, restart_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def stop(self) -> None:
        """SIGTERM every child, wait up to the grace period, SIGKILL (its whole session) what is left."""
        self._stopping.set()
        for s in self.children.values():
            if s.proc is not None and s.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    s.proc.send_signal(signal.SIGTERM)
        # Each task returns once its child has exited (a task still spawning SIGTERMs its new child itself).
        _done, pending = await asyncio.wait(self._tasks, timeout=self._grace_s) if self._tasks else (set(), set())
        if pending:
            for s in self.children.values():
                if s.proc is not None and s.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(s.proc.pid, signal.SIGKILL)
            await asyncio.wait(pending, timeout=5)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def status(self) -> dict[str, dict[str, object]]:
        return {
            name: {"pid": s.proc.pid if s.proc else None,
                   "running": bool(s.proc and s.proc.returncode is None),
                   "restarts": s.restarts, "last_exit": s.last_exit}
            for name, s in self.children.items()
        }

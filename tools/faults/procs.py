"""Processes as the kernel sees them: descendants from /proc, their memory and CPU time, and who outlived
the system.

``Census`` records every descendant of a root process (by default this one) each time it is polled —
pid, start time (so a reused pid is not mistaken for the same process) and command line — and later
says which of them are still alive (``leftovers``): a replica re-parented to init after its agent died
is still found, because it was recorded while it was a descendant.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot (field 22 of /proc/pid/stat)
    cmd: str


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/pid/stat`` after the command name (field 3 on), or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.rsplit(")", 1)[1].split()


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of ``pid``, or None when it is gone."""
    rest = _stat_fields(pid)
    return None if rest is None else (int(rest[1]), rest[0], int(rest[19]))


def cpu_ticks(pid: int) -> int | None:
    """User + system clock ticks ``pid`` has used (fields 14 and 15), or None when it is gone."""
    rest = _stat_fields(pid)
    return None if rest is None else int(rest[11]) + int(rest[12])


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(p: Proc) -> bool:
    """Still running (a zombie counts as gone) and still the same process (same start time)."""
    st = _stat(p.pid)
    return st is not None and st[1] != "Z" and st[2] == p.start


def descendants(root: int) -> list[Proc]:
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[int, str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is None:
            continue
        info[int(entry)] = st
        children.setdefault(st[0], []).append(int(entry))
    out: list[Proc] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        st = info[pid]
        if st[1] != "Z":
            out.append(Proc(pid, st[2], _cmd(pid)))
        todo.extend(children.get(pid, []))
    return out


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def short(cmd: str) -> str:
    """A readable name for a Graft process's command line."""
    parts = cmd.split()
    if "-m" in parts:
        i = parts.index("-m")
        mod = parts[i + 1] if i + 1 < len(parts) else "?"
        if mod == "services.worker.replica" and "--name" in parts:
            return f"replica {parts[parts.index('--name') + 1]}"
        return mod.replace("services.", "")
    if parts and parts[0].endswith("redis-server"):
        return "redis-server"
    return " ".join(parts[:3])


class Census:
    """``root``'s descendants from now on: those already running when the census begins (a test session's
    Redis, an earlier system of the same process) are none of its business and never counted or killed."""

    def __init__(self, root: int | None = None) -> None:
        self.root = os.getpid() if root is None else root
        self.seen: dict[tuple[int, int], Proc] = {}
        self.before = {(p.pid, p.start) for p in descendants(self.root)}

    def poll(self) -> list[Proc]:
        now = [p for p in descendants(self.root) if (p.pid, p.start) not in self.before]
        for p in now:
            self.seen.setdefault((p.pid, p.start), p)
        return now

    async def watch(self, stop: asyncio.Event, interval_s: float = 0.25) -> None:
        while not stop.is_set():
            self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def leftovers(self, *, exclude: set[int] | None = None) -> list[Proc]:
        skip = exclude or set()
        return [p for p in self.seen.values() if p.pid not in skip and alive(p)]

    async def wait_gone(self, timeout_s: float, *, exclude: set[int] | None = None) -> list[Proc]:
        """Leftovers after waiting up to ``timeout_s`` for them to go (processes exit asynchronously)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            left = self.leftovers(exclude=exclude)
            if not left or loop.time() >= end:
                return left
            await asyncio.sleep(0.1)


def kill_all(procs: list[Proc]) -> None:
    """SIGKILL what a check found left over, by pid (only the processes recorded as ours)."""
    for p in procs:
        if alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)

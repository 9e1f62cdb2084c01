"""Where the CPU went during a measurement, from Linux ``/proc``: the host's time by kind (user, system,
idle, and *steal*: taken by the hypervisor for other guests of this shared machine) and this process's
tree by role (replicas, ingresses, Redis, the bench itself as ``bench``: its load generator and
reader of replies).

``snapshot()`` before and after, ``cores(before, after)`` for the difference in cores' worth of time
(1.0 = one core busy for the whole span). A process that started or ended between the two readings
counts for the part seen in both (none, if it was in only one). Elsewhere than Linux both are empty.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from tools.faults.procs import cpu_ticks, descendants

HOST_FIELDS = {"user": 0, "system": 2, "idle": 3, "steal": 7}  # columns of /proc/stat's "cpu" line
# First match wins: a replica's command line also names services.worker.
ROLES = (("replica", "services.worker.replica"), ("ingress", "services.ingress"), ("planner", "services.planner"),
         ("agent", "services.worker"), ("gateway", "services.gateway"), ("redis", "redis-server"))


def host_ticks() -> list[int] | None:
    """The host's CPU time so far by kind (``/proc/stat``, clock ticks); None where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def host_cores(before: list[int] | None, after: list[int] | None, seconds: float) -> dict[str, float]:
    """Cores' worth of user, system, idle and steal time between two ``host_ticks`` readings."""
    if before is None or after is None or seconds <= 0:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {k: round((after[i] - before[i]) / tick / seconds, 3) for k, i in HOST_FIELDS.items()
            if i < min(len(before), len(after))}


def role_of(cmd: str) -> str:
    return next((role for role, mark in ROLES if mark in cmd), "other")


@dataclass
class Snapshot:
    at: float
    host: list[int] | None
    procs: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)  # (pid, start) → role, ticks


def snapshot(root: int | None = None) -> Snapshot:
    """The host's ticks, and the ticks of ``root`` (default: this process, as ``bench``) and every
    descendant by role."""
    me = os.getpid() if root is None else root
    snap = Snapshot(time.monotonic(), host_ticks())
    if snap.host is None:  # no /proc (not Linux): nothing to read, and descendants() could not list it
        return snap
    own = cpu_ticks(me)
    if own is not None:
        snap.procs[(me, 0)] = ("bench", own)
    for p in descendants(me):
        t = cpu_ticks(p.pid)
        if t is not None:
            snap.procs[(p.pid, p.start)] = (role_of(p.cmd), t)
    return snap


def cores(before: Snapshot, after: Snapshot) -> dict[str, dict[str, float]]:
    """``{"host": {user, system, idle, steal}, "roles": {role: cores}}`` between two snapshots."""
    seconds = after.at - before.at
    tick = os.sysconf("SC_CLK_TCK")
    roles: dict[str, float] = {}
    for key, (role, t) in after.procs.items():
        if key in before.procs and seconds > 0:
            roles[role] = roles.get(role, 0.0) + (t - before.procs[key][1]) / tick / seconds
    return {"host": host_cores(before.host, after.host, seconds),
            "roles": {k: round(v, 3) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])}}

"""Step 4 of planning: pack replicas onto devices, first-fit-decreasing by share (design.md §4).

A GPU holds replicas whose shares sum to at most 100 (MPS active-thread percentages) and at most
48 of them (the MPS client limit per GPU). On a CPU profile shares are thread counts; one device
then holds as many threads as the profile's largest grid share, the whole host it was measured on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from common.planning.types import GPU_CAPACITY, MAX_CLIENTS_PER_DEVICE, DevicePlacement, Group
from common.profiles import Profile


@dataclass(frozen=True, slots=True)
class DeviceKind:
    prefix: str
    capacity: int
    max_clients: int = MAX_CLIENTS_PER_DEVICE

    def name(self, index: int) -> str:
        return f"{self.prefix}{index}"


def device_kind(profile: Profile) -> DeviceKind:
    if profile.unit == "cpu_threads":
        return DeviceKind("cpu", max(profile.shares))
    return DeviceKind("gpu", GPU_CAPACITY)


def place(groups: Iterable[Group], kind: DeviceKind) -> tuple[DevicePlacement, ...]:
    """First-fit-decreasing: largest shares first, each replica on the first device with room."""
    replicas = sorted(((g.share, g.id) for g in groups for _ in range(g.replicas)),
                      key=lambda r: (-r[0], r[1]))
    used: list[int] = []
    held: list[list[tuple[str, int]]] = []
    for share, gid in replicas:
        if share > kind.capacity:
            raise ValueError(f"group {gid}: share {share} exceeds a device's capacity {kind.capacity}")
        for d in range(len(used)):
            if used[d] + share <= kind.capacity and len(held[d]) < kind.max_clients:
                used[d] += share
                held[d].append((gid, share))
                break
        else:
            used.append(share)
            held.append([(gid, share)])
    return tuple(DevicePlacement(kind.name(i), tuple(h)) for i, h in enumerate(held))


def fill_headroom(groups: Sequence[Group], placement: Sequence[DevicePlacement], kind: DeviceKind, *,
                  reserve: int = 0) -> tuple[tuple[Group, ...], tuple[DevicePlacement, ...]]:
    """Give the share a device has left to more replicas of the groups already on it.

    The plan is the least share that meets every budget at the expected load; on a host Graft owns
    (a CPU host: a device is its cores) the rest would only idle. Each free slot goes to the group on
    that device with the highest expected utilisation per replica (rate · L(B)/B / n) whose share fits,
    until nothing fits. The added replicas are counted as the group's ``spares``: headroom for bursts
    and a replica's death, not part of what the load requires (``Plan.required_share``).

    ``reserve``: share of each device left free (``GRAFT_CPU_RESERVE``, default 0). On 2026-12-03, with
    a scratch probe on two cores (MobileNetV2, 60 ms, client-measured), a second replica filling the
    other core served less than one alone (93.9% vs. 99.7% at 250 req/s), so the default kept a core
    for the ingress, Redis and producers. On 2026-12-04, with the serving path cheaper (replies
    overlapping the next batch, trimmed streams, one round trip per reply batch), ``graft bench e2e``
    found the opposite at both budgets: 427 vs. 317 req/s confirmed at 100 ms, and 310-344 req/s
    passing single points at 60 ms against 141 confirmed with the reserve (README, Benchmarks).
    """
    by_id = {g.id: g for g in groups}
    extra: dict[str, int] = {}
    out_placement: list[DevicePlacement] = []

    def load(gid: str) -> float:
        g = by_id[gid]
        n = g.replicas + extra.get(gid, 0)
        return g.rate_rps * (g.latency_ms / 1000.0) / max(g.batch, 1) / max(n, 1)

    for dev in placement:
        free = kind.capacity - reserve - dev.used
        reps = list(dev.replicas)
        while len(reps) < kind.max_clients:
            fits = sorted({gid for gid, share in reps if share <= free}, key=lambda gid: (-load(gid), gid))
            if not fits:
                break
            gid = fits[0]
            share = by_id[gid].share
            reps.append((gid, share))
            extra[gid] = extra.get(gid, 0) + 1
            free -= share
        out_placement.append(DevicePlacement(dev.device, tuple(reps)))
    out_groups = tuple(replace(g, replicas=g.replicas + extra.get(g.id, 0), spares=g.spares + extra.get(g.id, 0))
                       for g in groups)
    return out_groups, tuple(out_placement)

"""Step 4 of planning: pack replicas onto devices, first-fit-decreasing by share (design.md §4).

A GPU holds replicas whose shares sum to at most 100 (MPS active-thread percentages) and at most
48 of them (the MPS client limit per GPU). On a CPU profile shares are thread counts; one device
then holds as many threads as the profile's largest grid share, the whole host it was measured on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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

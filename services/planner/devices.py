"""Which devices exist: mapping a plan's placement onto the devices live worker agents host (pure).

``place()`` names devices ``gpu0…gpuK`` / ``cpu0…cpuK`` by first-fit-decreasing: positional names for
bins of replicas, which say nothing about the devices that exist. Devices of one kind are
interchangeable, so the planner gives each bin a *live* device of its kind (one a worker agent
reports in its heartbeat), skipping drained ones:

1. a bin keeps the device it had in the previous plan (same replicas on it) when that device can
   still serve it, so an unchanged plan keeps its device names (``same_serving`` holds, no epoch);
2. the other bins take the remaining live devices in natural order (``gpu2`` before ``gpu10``);
3. bins left over are *unplaced*: they keep a synthetic name that no live agent hosts and is not
   drained (their previous one if possible, else the lowest free index), so the plan stays complete
   and verifiable, an agent that later comes up with that name serves them at once, and the planner
   reports them instead of pretending they run.

A worker agent in "all CPU devices" mode serves every ``cpuN`` placement of the plan, so with one
alive every ``cpu`` bin is servable; with the live set unknown (``None``) every name is, which is the
old behaviour: positional names, renumbered past drained devices.

``LiveDevices`` turns heartbeat scans into the live set with a grace period: a device appears at
once, but disappears only after it was missing from ``misses`` consecutive scans spanning at least
``grace_s`` seconds, so one late heartbeat does not move replicas around.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CPU = "cpu"
ALL_CPU = "cpu*"  # LiveDevices' token for "some agent serves every cpu device" (not a device name)

_NAME = re.compile(r"^(.*?)(\d+)$")
_VALID = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")


def device_kind(name: str) -> str:
    """``gpu3`` → ``gpu``: devices of one kind are interchangeable."""
    m = _NAME.match(name)
    return m.group(1) if m else name


def device_index(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(2)) if m else None


def natural_key(name: str) -> tuple[str, int, str]:
    """Sort key: kind, then index as a number (``gpu2`` before ``gpu10``), unnumbered names last."""
    i = device_index(name)
    return device_kind(name), (i if i is not None else 1 << 62), name


@dataclass(frozen=True, slots=True)
class Assignment:
    """A placement on real device names, and the bins no live device could take."""

    placement: list[dict[str, Any]]
    unplaced: list[dict[str, Any]]  # [{"device": synthetic name, "replicas": count}], in placement order

    @property
    def unplaced_replicas(self) -> int:
        return sum(int(u["replicas"]) for u in self.unplaced)


@dataclass(frozen=True, slots=True)
class _Devices:
    live: frozenset[str] | None
    drained: frozenset[str]
    all_cpu: bool

    def open_kind(self, kind: str) -> bool:
        """Every (non-drained) name of this kind is served by some agent."""
        return self.live is None or (self.all_cpu and kind == CPU)

    def servable(self, name: str) -> bool:
        if name in self.drained:
            return False
        return self.open_kind(device_kind(name)) or (self.live is not None and name in self.live)


def _signature(entry: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((str(r["group"]), int(r["share"])) for r in entry.get("replicas", [])))


def _count(entry: Mapping[str, Any]) -> int:
    return len(entry.get("replicas", []))


def assign_devices(placement: Sequence[Mapping[str, Any]], live: Collection[str] | None,
                   drained: Collection[str] = (), *, all_cpu: bool = False,
                   previous: Sequence[Mapping[str, Any]] | None = None) -> Assignment:
    """Rename ``placement``'s devices onto live, non-drained devices of the same kind.

    ``placement``: ``[{"device", "replicas"}]`` as ``place()`` names it (the kind is the name's
    prefix); ``live``: device names that live worker agents host (``None``: unknown, every name
    counts as served); ``drained``: devices that must receive nothing; ``all_cpu``: a live agent serves
    every ``cpuN``; ``previous``: the current plan's placement, whose device choices are kept where
    they still work. The entries keep their order (replica indices follow it) and their replicas.
    """
    devs = _Devices(None if live is None else frozenset(live), frozenset(drained), all_cpu)
    entries = [dict(p) for p in placement]
    chosen: list[str | None] = [None] * len(entries)
    used: set[str] = set()

    # 1. Stickiness: the same replicas stay on the device they had, if it still serves.
    before: dict[tuple[tuple[str, int], ...], list[str]] = {}
    for p in previous or ():
        before.setdefault(_signature(p), []).append(str(p["device"]))
    for i, e in enumerate(entries):
        kind = device_kind(str(e["device"]))
        for name in before.get(_signature(e), []):
            if name not in used and device_kind(name) == kind and devs.servable(name):
                chosen[i] = name
                used.add(name)
                before[_signature(e)].remove(name)
                break

    # 2. The rest take free servable devices of their kind, in natural order.
    free: dict[str, list[str]] = {}
    for name in sorted(devs.live or (), key=natural_key):
        if devs.servable(name) and name not in used:
            free.setdefault(device_kind(name), []).append(name)
    for i, e in enumerate(entries):
        if chosen[i] is not None:
            continue
        kind = device_kind(str(e["device"]))
        queue = free.get(kind, [])
        while queue and queue[0] in used:
            queue.pop(0)
        if queue:
            chosen[i] = queue.pop(0)
        elif devs.open_kind(kind):
            chosen[i] = _lowest_free(kind, lambda n: n in used or n in devs.drained)
        else:
            continue
        used.add(str(chosen[i]))

    # 3. Unplaced: a synthetic name no live agent hosts (the previous one when still free).
    def taken(n: str) -> bool:
        return n in used or n in devs.drained or (devs.live is not None and n in devs.live)

    unplaced: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        got = chosen[i]
        if got is None:
            kind, sig = device_kind(str(e["device"])), _signature(e)
            got = next((n for n in before.get(sig, []) if device_kind(n) == kind and not taken(n)), None)
            if got is not None:
                before[sig].remove(got)
            else:
                got = _lowest_free(kind, taken)
            used.add(got)
            if _count(e):
                unplaced.append({"device": got, "replicas": _count(e)})
        e["device"] = got
    return Assignment(entries, unplaced)


def _lowest_free(kind: str, taken: Callable[[str], bool]) -> str:
    i = 0
    while taken(f"{kind}{i}"):
        i += 1
    return f"{kind}{i}"


def shortfall(placement: Sequence[Mapping[str, Any]], live: Collection[str] | None, drained: Collection[str] = (),
              *, all_cpu: bool = False) -> list[dict[str, Any]]:
    """The entries of ``placement`` (as it is, no renaming) on devices nobody serves now."""
    devs = _Devices(None if live is None else frozenset(live), frozenset(drained), all_cpu)
    return [{"device": str(p["device"]), "replicas": _count(p)} for p in placement
            if _count(p) and not devs.servable(str(p["device"]))]


def needs_reassignment(plan: Mapping[str, Any], live: Collection[str] | None, drained: Collection[str] = (),
                       *, all_cpu: bool = False) -> bool:
    """True when ``plan`` would be placed differently on these devices, or reports a stale shortfall.

    That is: a replica sits on a device that no longer serves (its agent died), or an unplaced one
    could now get a device (an agent appeared), or the plan's ``unplaced`` report is out of date.
    """
    placement = list(plan.get("placement", []))
    a = assign_devices(placement, live, drained, all_cpu=all_cpu, previous=placement)
    moved = [p["device"] for p in a.placement] != [str(p["device"]) for p in placement]
    return moved or a.unplaced != list(plan.get("unplaced", []))


@dataclass
class LiveDevices:
    """The devices worker agents host, from successive heartbeat scans, with a grace for absences."""

    grace_s: float = 3.0
    misses: int = 2
    _first_missed: dict[str, float] = field(default_factory=dict)
    _missed: dict[str, int] = field(default_factory=dict)
    _live: set[str] | None = None

    @property
    def live(self) -> frozenset[str] | None:
        """Device names served now (``None`` before the first scan)."""
        return None if self._live is None else frozenset(n for n in self._live if n != ALL_CPU)

    @property
    def all_cpu(self) -> bool:
        return self._live is not None and ALL_CPU in self._live

    def observe(self, seen: Iterable[str], all_cpu: bool, now: float) -> tuple[set[str], set[str]]:
        """Fold one scan in; returns the devices that (appeared, disappeared) in the live set."""
        tokens = set(seen) | ({ALL_CPU} if all_cpu else set())
        if self._live is None:
            self._live = set(tokens)
            return set(tokens), set()
        appeared = tokens - self._live
        self._live |= appeared
        gone: set[str] = set()
        for name in list(self._live):
            if name in tokens:
                self._first_missed.pop(name, None)
                self._missed.pop(name, None)
                continue
            first = self._first_missed.setdefault(name, now)
            self._missed[name] = self._missed.get(name, 0) + 1
            if self._missed[name] >= self.misses and now - first >= self.grace_s:
                gone.add(name)
        for name in gone:
            self._live.discard(name)
            self._first_missed.pop(name, None)
            self._missed.pop(name, None)
        return appeared, gone


def parse_worker_status(status: Mapping[str, Any]) -> tuple[list[str], bool]:
    """Devices one worker heartbeat reports, and whether that agent serves every cpu device.

    Garbage yields ``([], False)``. ``all_cpu_devices`` is honoured when an agent reports it; an agent
    that does not is still followed, since it adopts each ``cpuN`` of the plan and then reports it.
    """
    raw = status.get("devices")
    if not isinstance(raw, list):
        return [], False
    names = [d for d in raw if isinstance(d, str) and _VALID.fullmatch(d)]
    return names, status.get("all_cpu_devices") is True

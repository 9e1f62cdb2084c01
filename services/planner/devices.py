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

Device names may be host-qualified: an agent with ``GRAFT_NODE=a`` hosts ``a/gpu0``, ``a/gpu1``, …
(several GPU hosts would otherwise all claim ``gpu0``). A name's *kind* is the part after the last
slash without its digits (``a/gpu3`` and ``gpu3`` are both ``gpu``), so a bin ``place()`` called
``gpu0`` may go to any node's GPU; free live devices are taken index by index across nodes
(``a/gpu0``, ``b/gpu0``, ``a/gpu1``, …), which spreads the fullest bins over the hosts. Synthetic
names of unplaced bins stay plain (``gpu1``).

A worker agent in "all CPU devices" mode serves every CPU placement of the plan *on its node*:
``a/cpuN`` for node ``a``, plain ``cpuN`` for an agent without a node. With one alive every ``cpu``
bin is servable (bins beyond the live devices go to ``a/cpu1``, ``a/cpu2``, …, spread over such
nodes); with the live set unknown (``None``) every name is, which is the old behaviour: positional
names, renumbered past drained devices.

``LiveDevices`` turns heartbeat scans into the live set with a grace period: a device appears at
once, but disappears only after it was missing from ``misses`` consecutive scans spanning at least
``grace_s`` seconds, so one late heartbeat does not move replicas around.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.settings import NODE_PATTERN

CPU = "cpu"
# LiveDevices' token for "some agent serves every cpu device" of its node: ``cpu*``, ``a/cpu*`` (not a
# device name).
ALL_CPU = "cpu*"

_NAME = re.compile(r"^(.*?)(\d+)$")
_VALID = re.compile(rf"(?:{NODE_PATTERN}/)?[A-Za-z][A-Za-z0-9_.:-]{{0,63}}")
_NODE = re.compile(NODE_PATTERN)

AllCpu = bool | Collection[str]  # True: an agent without a node serves every plain cpuN; or the nodes that do


def device_node(name: str) -> str:
    """``a/gpu3`` → ``a``; ``gpu3`` → ``""`` (no node: a one-host deployment's name)."""
    return name.rpartition("/")[0]


def qualify(node: str, local: str) -> str:
    """``("a", "gpu3")`` → ``a/gpu3``; ``("", "gpu3")`` → ``gpu3``."""
    return f"{node}/{local}" if node else local


def kind_of(name: str) -> str:
    """``gpu3``, ``a/gpu3`` → ``gpu``: devices of one kind are interchangeable, whichever node hosts them."""
    local = name.rpartition("/")[2]
    m = _NAME.match(local)
    return m.group(1) if m else local


def device_index(name: str) -> int | None:
    m = _NAME.match(name.rpartition("/")[2])
    return int(m.group(2)) if m else None


def natural_key(name: str) -> tuple[str, int, str, str]:
    """Sort key: kind, then index as a number (``gpu2`` before ``gpu10``), then node, unnumbered names last.

    Index before node: ``a/gpu0``, ``b/gpu0``, ``a/gpu1``, … takes one GPU of each host in turn.
    """
    i = device_index(name)
    return kind_of(name), (i if i is not None else 1 << 62), device_node(name), name


def _cpu_nodes(all_cpu: AllCpu) -> frozenset[str]:
    if isinstance(all_cpu, bool):
        return frozenset({""}) if all_cpu else frozenset()
    if isinstance(all_cpu, str):
        return frozenset({all_cpu})
    return frozenset(all_cpu)


def _is_all_cpu_token(name: str) -> bool:
    return name.rpartition("/")[2] == ALL_CPU


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
    cpu_nodes: frozenset[str]  # nodes ("" for none) where an agent serves every cpu device

    @classmethod
    def of(cls, live: Collection[str] | None, drained: Collection[str], all_cpu: AllCpu) -> _Devices:
        return cls(None if live is None else frozenset(live), frozenset(drained), _cpu_nodes(all_cpu))

    def open_prefixes(self, kind: str) -> list[str]:
        """Name prefixes under which every (non-drained) index of this kind is served by some agent."""
        if self.live is None:
            return [kind]
        return [qualify(n, CPU) for n in sorted(self.cpu_nodes)] if kind == CPU else []

    def servable(self, name: str) -> bool:
        if name in self.drained:
            return False
        if self.live is None or name in self.live:
            return True
        return kind_of(name) == CPU and device_node(name) in self.cpu_nodes


def _signature(entry: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((str(r["group"]), int(r["share"])) for r in entry.get("replicas", [])))


def _count(entry: Mapping[str, Any]) -> int:
    return len(entry.get("replicas", []))


def assign_devices(placement: Sequence[Mapping[str, Any]], live: Collection[str] | None,
                   drained: Collection[str] = (), *, all_cpu: AllCpu = False,
                   previous: Sequence[Mapping[str, Any]] | None = None) -> Assignment:
    """Rename ``placement``'s devices onto live, non-drained devices of the same kind.

    ``placement``: ``[{"device", "replicas"}]`` as ``place()`` names it (the kind is the name's
    prefix); ``live``: device names that live worker agents host (``None``: unknown, every name
    counts as served); ``drained``: devices that must receive nothing; ``all_cpu``: the nodes where a
    live agent serves every ``node/cpuN`` (``True``: an agent without a node serves every plain
    ``cpuN``); ``previous``: the current plan's placement, whose device choices are kept where
    they still work. The entries keep their order (replica indices follow it) and their replicas.
    """
    devs = _Devices.of(live, drained, all_cpu)
    entries = [dict(p) for p in placement]
    chosen: list[str | None] = [None] * len(entries)
    used: set[str] = set()

    # 1. Stickiness: the same replicas stay on the device they had, if it still serves.
    before: dict[tuple[tuple[str, int], ...], list[str]] = {}
    for p in previous or ():
        before.setdefault(_signature(p), []).append(str(p["device"]))
    for i, e in enumerate(entries):
        kind = kind_of(str(e["device"]))
        for name in before.get(_signature(e), []):
            if name not in used and kind_of(name) == kind and devs.servable(name):
                chosen[i] = name
                used.add(name)
                before[_signature(e)].remove(name)
                break

    # 2. The rest take free servable devices of their kind, in natural order.
    free: dict[str, list[str]] = {}
    for name in sorted(devs.live or (), key=natural_key):
        if devs.servable(name) and name not in used:
            free.setdefault(kind_of(name), []).append(name)
    for i, e in enumerate(entries):
        if chosen[i] is not None:
            continue
        kind = kind_of(str(e["device"]))
        queue = free.get(kind, [])
        while queue and queue[0] in used:
            queue.pop(0)
        if queue:
            chosen[i] = queue.pop(0)
        elif prefixes := devs.open_prefixes(kind):
            chosen[i] = _lowest_free(prefixes, lambda n: n in used or n in devs.drained)
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
            kind, sig = kind_of(str(e["device"])), _signature(e)
            got = next((n for n in before.get(sig, []) if kind_of(n) == kind and not taken(n)), None)
            if got is not None:
                before[sig].remove(got)
            else:
                got = _lowest_free([kind], taken)
            used.add(got)
            if _count(e):
                unplaced.append({"device": got, "replicas": _count(e)})
        e["device"] = got
    return Assignment(entries, unplaced)


def _lowest_free(prefixes: Sequence[str], taken: Callable[[str], bool]) -> str:
    """The lowest index free under any prefix, prefixes in turn: ``a/cpu1``, ``b/cpu1``, ``a/cpu2``, …"""
    i = 0
    while True:
        for prefix in prefixes:
            if not taken(f"{prefix}{i}"):
                return f"{prefix}{i}"
        i += 1


def shortfall(placement: Sequence[Mapping[str, Any]], live: Collection[str] | None, drained: Collection[str] = (),
              *, all_cpu: AllCpu = False) -> list[dict[str, Any]]:
    """The entries of ``placement`` (as it is, no renaming) on devices nobody serves now."""
    devs = _Devices.of(live, drained, all_cpu)
    return [{"device": str(p["device"]), "replicas": _count(p)} for p in placement
            if _count(p) and not devs.servable(str(p["device"]))]


def needs_reassignment(plan: Mapping[str, Any], live: Collection[str] | None, drained: Collection[str] = (),
                       *, all_cpu: AllCpu = False) -> bool:
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
        return None if self._live is None else frozenset(n for n in self._live if not _is_all_cpu_token(n))

    @property
    def all_cpu(self) -> bool:
        """Some live agent serves every cpu device of its node."""
        return bool(self.all_cpu_nodes)

    @property
    def all_cpu_nodes(self) -> frozenset[str]:
        """The nodes (``""``: no node) where a live agent serves every cpu device."""
        return frozenset(device_node(n) for n in self._live or () if _is_all_cpu_token(n))

    def observe(self, seen: Iterable[str], all_cpu: AllCpu, now: float) -> tuple[set[str], set[str]]:
        """Fold one scan in; returns the devices that (appeared, disappeared) in the live set.

        ``all_cpu``: the nodes of the whole-CPU agents seen (``True``: one without a node); they show
        up as tokens ``cpu*`` / ``a/cpu*`` in what appeared and disappeared.
        """
        tokens = set(seen) | {qualify(n, ALL_CPU) for n in _cpu_nodes(all_cpu)}
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


def parse_worker_status(status: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """Devices one worker heartbeat reports, and the node whose every cpu device that agent serves.

    The node is ``None`` unless the agent reports ``all_cpu_devices``, ``""`` for an agent without a
    node; it is the heartbeat's ``node``, or, from an agent that does not report one, the node of its
    devices. Garbage yields ``([], None)``. An agent that does not report ``all_cpu_devices`` is still
    followed, since it adopts each cpu device of the plan and then reports it.
    """
    raw = status.get("devices")
    if not isinstance(raw, list):
        return [], None
    names = [d for d in raw if isinstance(d, str) and _VALID.fullmatch(d)]
    if status.get("all_cpu_devices") is not True:
        return names, None
    node = status.get("node")
    if isinstance(node, str) and (node == "" or _NODE.fullmatch(node)):
        return names, node
    nodes = {device_node(n) for n in names}
    return names, nodes.pop() if len(nodes) == 1 else ""

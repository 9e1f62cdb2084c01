"""Turning observed traffic and admin commands into the next plan (pure: no Redis).

The planner re-plans when the traffic drifted past a threshold and the current epoch is old enough
(hysteresis: a minimum epoch length stops a noisy rate from flapping plans), or at once when an admin
asks. Admin overrides survive re-plans: a group pinned with ``graft scale`` keeps at least its
replicas while a group with the same model and cuts exists, and drained devices receive no replicas.

``graft plan apply`` (control ``{"cmd": "plan", "workload", "policy"?, "hold"?}``) plans a given
workload — with the given policy — instead of the observed one; with ``hold`` the planner then keeps
that plan (no drift or calibration re-plan) until ``{"cmd": "release"}``. Benchmarks use it so the
plan in force at each load point is made for that point, and never changes during a measurement.
Every plan's placement is then mapped onto the devices live worker agents host
(``services/planner/devices.py``); replicas no live device can take are listed under ``unplaced``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from common.planning.place import device_kind, fill_headroom, place
from common.planning.policies import plan as make_plan
from common.planning.types import Group, Plan, workload_from_dict
from common.profiles import Profile
from services.planner.devices import AllCpu, assign_devices

GroupKey = tuple[str, tuple[int, ...]]


@dataclass
class Steering:
    """Admin state the planner keeps between epochs."""

    pinned: dict[GroupKey, int] = field(default_factory=dict)
    drained: set[str] = field(default_factory=set)
    workload: dict[str, Any] | None = None  # an explicit workload to plan (``plan`` command)
    policy: str | None = None  # the policy of that plan (None: the service's)
    hold: bool = False  # keep the current plan: no drift or calibration re-plans

    def apply(self, cmd: Mapping[str, Any], current: Mapping[str, Any] | None) -> str:
        """Record one control command; returns a short description (raises ValueError when malformed)."""
        kind = cmd.get("cmd")
        if kind == "replan":
            return "replan"
        if kind == "plan":
            workload, policy = cmd.get("workload"), cmd.get("policy")
            workload_from_dict(workload if isinstance(workload, Mapping) else {})  # raises when malformed
            if policy is not None and policy not in ("graft", "per-cut"):
                raise ValueError(f"plan: policy must be graft or per-cut, got {policy!r}")
            self.workload, self.policy, self.hold = dict(workload), policy, bool(cmd.get("hold", False))  # type: ignore[arg-type]
            return f"plan {len(self.workload['fragments'])} fragments" + (f" with {policy}" if policy else "")
        if kind == "release":
            self.workload, self.policy, self.hold = None, None, False
            return "release"
        if kind == "scale":
            gid, n = cmd.get("group"), cmd.get("replicas")
            if not isinstance(n, int) or n < 1:
                raise ValueError("scale needs replicas >= 1")
            groups = {g["id"]: g for g in (current or {}).get("groups", [])}
            if gid not in groups:
                raise ValueError(f"scale: no group {gid!r} in the current plan")
            g = groups[gid]
            self.pinned[(str(g["model"]), tuple(int(c) for c in g["cuts"]))] = n
            return f"scale {gid} to {n}"
        if kind in ("drain", "undrain"):
            dev = cmd.get("device")
            if not isinstance(dev, str) or not dev:
                raise ValueError(f"{kind} needs a device name")
            (self.drained.add if kind == "drain" else self.drained.discard)(dev)
            return f"{kind} {dev}"
        raise ValueError(f"unknown control command {kind!r}")


def next_plan(profile: Profile, workload: Mapping[str, Any], *, epoch: int, rho: float, steering: Steering,
              profile_name: str, policy: str = "graft", live: Collection[str] | None = None,
              all_cpu: AllCpu = False, previous: Sequence[Mapping[str, Any]] | None = None,
              spares: int = 0, fill: bool = True, cpu_reserve: int = 0) -> dict[str, Any]:
    """Plan ``workload`` with ``policy``, apply pins, then put the placement on live, non-drained devices.

    ``live``: device names live worker agents host (``None``: unknown, keep positional names);
    ``all_cpu``: the nodes where a live agent serves every ``node/cpuN`` (``True``: an agent without a
    node serves every plain ``cpuN``); ``previous``: the current plan's placement, whose
    device choices are kept where they still work. The plan gets ``unplaced``: the devices (synthetic
    names nobody hosts) whose replicas no live device could take, ``[{"device", "replicas": count}]``.
    ``fill``/``cpu_reserve``: on a CPU profile, give each device's share beyond ``cpu_reserve`` to more
    replicas (``fill_headroom``).
    """
    fragments = workload_from_dict(workload)
    plan = make_plan(profile, fragments, policy, rho=rho, epoch=epoch, profile_name=profile_name, spares=spares)
    plan = _apply_pins(plan, steering.pinned, profile)
    if fill and profile.unit == "cpu_threads":
        groups, placement = fill_headroom(plan.groups, plan.placement, device_kind(profile), reserve=cpu_reserve)
        plan = replace(plan, groups=groups, placement=placement)
    out = plan.to_dict()
    assigned = assign_devices(out["placement"], live, steering.drained, all_cpu=all_cpu, previous=previous)
    out["placement"] = assigned.placement
    out["unplaced"] = assigned.unplaced
    out["workload"] = list(workload["fragments"])
    return out


def same_serving(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """True when two plans run the same groups with the same (B, g, n) on the same devices.

    Publishing such a plan would only churn replica processes (a new epoch means new streams and
    new replicas), so the planner keeps the current epoch and just moves its drift baseline.
    Report-only keys (``workload``, ``unplaced``) do not count: whether a device is served follows
    from its name and the live agents, so equal device names mean equal service.
    """
    if a is None:
        return False

    def shape(p: Mapping[str, Any]) -> tuple[Any, ...]:
        groups = sorted((g["model"], tuple(g["cuts"]), g["batch"], g["share"], g["replicas"]) for g in p["groups"])
        devices = sorted((d["device"], len(d["replicas"])) for d in p.get("placement", []))
        return tuple(groups), tuple(devices)

    return shape(a) == shape(b)


def _apply_pins(plan: Plan, pinned: Mapping[GroupKey, int], profile: Profile) -> Plan:
    if not pinned:
        return plan
    groups: list[Group] = []
    for g in plan.groups:
        n = pinned.get((g.model, tuple(g.cuts)))
        groups.append(replace(g, replicas=max(g.replicas, n)) if n else g)
    return replace(plan, groups=tuple(groups), placement=place(groups, device_kind(profile)))

"""Admission inputs of one group from the plan and the replicas' measured speed (ingress only)."""

from __future__ import annotations

from common.contract.routing import GroupSpec, PlanView, Serving
from services.ingress.shedding import GroupSpeed, speed_factor


def table_of(spec: GroupSpec) -> tuple[float, ...]:
    """The group's planned ``L(1..B)``; plans without a table get one from ``L(B)`` (proportional in b)."""
    if spec.latency_table_ms:
        return spec.latency_table_ms
    full = max(spec.latency_ms, 1e-3)
    return tuple(full * b / spec.batch for b in range(1, spec.batch + 1))


def speed(view: PlanView, spec: GroupSpec, serving: Serving, drain_per_ms: float | None = None) -> GroupSpeed:
    """``drain_per_ms``: the group's measured drain while saturated (``DrainMeter``), None if it is not."""
    stream = view.stream(spec.id)
    scale = view.latency_scale.get(spec.model, 1.0)
    return GroupSpeed(serving.live(stream), table_of(spec), speed_factor(serving.ratios.get(stream, []), scale),
                      drain_per_ms)

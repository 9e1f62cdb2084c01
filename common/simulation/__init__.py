"""Discrete-event simulation of a plan (design.md section 9), with the workers' own batching policy.

    traffic   routing of workload fragments to plan groups; Poisson or periodic arrivals
    engine    the event loop: shared EDF queue per group, replicas, re-aligned batch latency, jitter
    report    per group and overall attainment, latency percentiles, batch sizes, utilisation
"""

from common.simulation.engine import simulate
from common.simulation.report import GroupReport, Outcome, SimReport
from common.simulation.traffic import ARRIVALS, SimulationError, Unserved, arrival_times, assign

__all__ = [
    "ARRIVALS", "GroupReport", "Outcome", "SimReport", "SimulationError", "Unserved", "arrival_times",
    "assign", "simulate",
]

"""The planner (design.md section 5): pure functions from a profile and a workload to a plan.

    merge     merge identical (model, cut) fragments; split them into budget classes by cost
    group     partition one model's fragments into re-aligned groups (DP, local search, exact oracle)
    allocate  (B, g, n) per group by search over the profile grid (section 4)
    place     first-fit-decreasing of replicas onto devices
    policies  ``plan(profile, fragments, policy)`` for graft, per-cut and oracle
    verify    an independent check of any plan against section 4
"""

from common.planning.allocate import Allocation, GroupAllocator
from common.planning.policies import ORACLE_LIMIT, plan
from common.planning.types import (
    POLICIES,
    DevicePlacement,
    Fragment,
    Group,
    Infeasible,
    Plan,
    PlanningError,
    load_plan_dict,
    load_workload,
    save_workload,
    workload_from_dict,
    workload_to_dict,
)
from common.planning.verify import Violation, verify_plan

__all__ = [
    "ORACLE_LIMIT", "POLICIES", "Allocation", "DevicePlacement", "Fragment", "Group", "GroupAllocator",
    "Infeasible", "Plan", "PlanningError", "Violation", "load_plan_dict", "load_workload", "plan",
    "save_workload", "verify_plan", "workload_from_dict", "workload_to_dict",
]

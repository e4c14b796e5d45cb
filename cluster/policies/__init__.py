"""Pure scheduling policies shared by the controller and the simulator.

Every decision is a call ``policy.method(snapshot) -> decision`` over plain
dataclasses (``cluster.policies.types``): no Ray, torch, clock or I/O inside.
Policies are chosen by name from the registries below.
"""

from cluster.policies.admission import AdmissionPolicy, BoundedQueue
from cluster.policies.registry import (
    ROUTERS,
    SCHEDULERS,
    make_router,
    make_scheduler,
    scheduler_from_spec,
)
from cluster.policies.router import RouterPolicy
from cluster.policies.scheduler import SchedulerPolicy
from cluster.policies.types import (
    AdmissionDecision,
    RequestView,
    Route,
    SchedulingRound,
    WorkerView,
)

__all__ = [
    "AdmissionDecision", "AdmissionPolicy", "BoundedQueue", "ROUTERS", "RequestView", "Route",
    "RouterPolicy", "SCHEDULERS", "SchedulerPolicy", "SchedulingRound", "WorkerView",
    "make_router", "make_scheduler", "scheduler_from_spec",
]

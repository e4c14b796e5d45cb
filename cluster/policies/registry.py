"""Policies by name, for configs and the simulator."""

from __future__ import annotations

from cluster.policies.router import LeastLoaded, PrefixAware, RoundRobin, RouterPolicy
from cluster.policies.scaling import QueueDepth, ScalingPolicy
from cluster.policies.scheduler import FCFS, LearnedRank, SchedulerPolicy, SJFOracle

SCHEDULERS: dict[str, type[SchedulerPolicy]] = {
    cls.name: cls for cls in (FCFS, SJFOracle, LearnedRank)}
ROUTERS: dict[str, type[RouterPolicy]] = {
    cls.name: cls for cls in (RoundRobin, LeastLoaded, PrefixAware)}
SCALERS: dict[str, type[ScalingPolicy]] = {cls.name: cls for cls in (QueueDepth,)}


def make_scheduler(name: str, **kwargs) -> SchedulerPolicy:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is unknown; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](**kwargs)


def make_router(name: str) -> RouterPolicy:
    if name not in ROUTERS:
        raise ValueError(f"router {name!r} is unknown; known: {', '.join(ROUTERS)}")
    return ROUTERS[name]()


def make_scaler(spec) -> ScalingPolicy:
    """The scaling policy an ``AutoscaleSpec`` names, for one pool."""
    if spec.policy not in SCALERS:
        raise ValueError(f"scaling policy {spec.policy!r} is unknown; known: {', '.join(SCALERS)}")
    return SCALERS[spec.policy](spec)

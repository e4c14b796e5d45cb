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


def scheduler_from_spec(spec) -> SchedulerPolicy:
    """The scheduler a config's ``SchedulerSpec`` names, with its knobs."""
    return make_scheduler(spec.policy, starvation_rounds=spec.starvation_rounds,
                          quantum_rounds=spec.quantum_rounds, max_wait_s=spec.max_wait_s,
                          score_wait_s=spec.score_wait_s)


def make_router(name: str) -> RouterPolicy:
    if name not in ROUTERS:
        raise ValueError(f"router {name!r} is unknown; known: {', '.join(ROUTERS)}")
    return ROUTERS[name]()


def make_scaler(spec) -> ScalingPolicy:
    """The scaling policy an ``AutoscaleSpec`` names, for one pool."""
    if spec.policy not in SCALERS:
        raise ValueError(f"scaling policy {spec.policy!r} is unknown; known: {', '.join(SCALERS)}")
    return SCALERS[spec.policy](spec)

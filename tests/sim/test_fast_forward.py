"""Fast-forwarded decode windows give exactly the per-step planner's results."""

import pytest

from sim.runner import simulate
from sim.workload import WorkloadSpec


def timings(spec):
    res = simulate(spec, WorkloadSpec(arrival="poisson", rate=20, num_requests=200,
                                      lengths="azure-conv", seed=3))
    return res, [(t.first_token_s, t.finish_s, t.max_gap_s, t.preemptions) for t in res.trackers]


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_windows_match_planner_steps_with_preemption(make_spec, mode):
    # L4 at 80% memory: little KV room, so the planner preempts
    exact, a = timings(make_spec(mode, replicas=2, decode=2, fast_forward=False,
                                 memory_utilization=0.8))
    fast, b = timings(make_spec(mode, replicas=2, decode=2, fast_forward=True,
                                memory_utilization=0.8))
    assert a == b
    assert fast.summary.preemptions == exact.summary.preemptions > 0
    assert fast.summary.extra["windows"] > 0
    assert fast.summary.extra["planner_calls"] < exact.summary.extra["planner_calls"] / 2

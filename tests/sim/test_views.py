"""Worker views handed to a policy are snapshots: a router that keeps them sees
the values they had when it was called, and keeping them changes nothing in
the run (the simulator reuses a view object only when nobody else holds it)."""

import dataclasses

import pytest

from cluster.policies.router import LeastLoaded
from sim.core import Simulation
from sim.runner import result_json
from sim.workload import WorkloadSpec, build_workload

WORKLOAD = WorkloadSpec(arrival="poisson", rate=30, num_requests=150, lengths="azure-conv",
                        seed=4)


class KeepingRouter(LeastLoaded):
    """Least loaded, keeping every view list it is given and the values then."""

    def __init__(self) -> None:
        self.kept: list[tuple[list, list[tuple]]] = []

    def route(self, request, prefill, decode, prefix_hits=None):
        self.kept.append((list(decode), [dataclasses.astuple(v) for v in decode]))
        return super().route(request, prefill, decode, prefix_hits)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_kept_views_do_not_change_and_keeping_them_changes_nothing(make_spec, mode):
    spec = make_spec(mode, replicas=3, decode=2)
    plain = Simulation(spec, build_workload(WORKLOAD)).run()
    sim = Simulation(spec, build_workload(WORKLOAD))
    router = sim.controller.router = KeepingRouter()
    kept = sim.run()
    assert len(router.kept) >= WORKLOAD.num_requests
    for views, values in router.kept:
        assert [dataclasses.astuple(v) for v in views] == values
    assert result_json(kept) == result_json(plain)
    assert kept.dispatch_order == plain.dispatch_order

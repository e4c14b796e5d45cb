"""The simulator's workers rank decoding requests as the real ones do: the
scheduler's ``placement`` at dispatch (priority, starvation boost) travels with
the request, so under KV pressure the lowest-ranked one is preempted first."""

import pytest

from sim.core import Simulation
from sim.workload import Request, Workload, WorkloadSpec


def _run(make_spec, mode: str, scheduler: str):
    spec = make_spec(mode, scheduler=scheduler, kv_from="config",
                     batch={"max_num_seqs": 8, "max_num_batched_tokens": 2048,
                            "prefill_chunk_size": 512})
    sim = Simulation(spec, Workload(WorkloadSpec(num_requests=2), [], closed=False))
    tokens = sim.decode[0].blocks.num_blocks * sim.decode[0].spec.block_size
    # the long one arrives alone and starts; the short one joins a moment later;
    # together they outgrow the KV cache before either finishes
    reqs = [Request(0, 0.0, tokens // 4, tokens // 2), Request(1, 0.01, tokens // 4, tokens // 3)]
    sim = Simulation(spec, Workload(WorkloadSpec(num_requests=2), reqs, closed=False))
    return {t.req.request_id: t.preemptions for t in sim.run().trackers}


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_the_lowest_ranked_request_is_preempted_first(make_spec, mode):
    # sjf-oracle ranks the long request lowest: it gives up its KV, though it came first
    ranked = _run(make_spec, mode, "sjf-oracle")
    assert ranked["r0"] > 0 and ranked["r1"] == 0
    # fcfs ranks both alike: the latest admitted goes first, as in the engine
    fcfs = _run(make_spec, mode, "fcfs")
    assert fcfs["r1"] > 0 and fcfs["r0"] == 0

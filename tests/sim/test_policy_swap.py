"""Swapping the scheduler by name changes the simulated schedule: the
simulator only builds snapshots; the order comes from cluster.policies."""

from cluster.config import ClusterConfig
from sim.runner import simulate
from sim.spec import spec_from_cluster_config
from sim.workload import WorkloadSpec

CONFIG = {
    "name": "swap", "model": {"source": "llama-3.1-8b", "dtype": "bfloat16"},
    "pools": [{"name": "mixed", "role": "mixed", "gpu_type": "L4", "replicas": 1,
               "max_num_seqs": 2, "max_num_batched_tokens": 2048, "prefill_chunk_size": 2048}],
    "scheduler": {"policy": "fcfs"},
}
BURST = WorkloadSpec(arrival="poisson", rate=1e6, num_requests=10, lengths="azure-conv", seed=7)


def run(policy: str):
    cfg = ClusterConfig.from_dict({**CONFIG, "scheduler": {"policy": policy}})
    return simulate(spec_from_cluster_config(cfg), BURST)


def test_scheduler_policy_by_name_changes_the_schedule():
    fcfs, sjf = run("fcfs"), run("sjf-oracle")
    reqs = [t.req for t in fcfs.trackers]
    # all ten arrive within microseconds; two fit the batch, the rest queue
    assert fcfs.dispatch_order == [f"r{i}" for i in range(10)]
    queued = sorted(reqs[2:], key=lambda r: (r.output_tokens, r.arrival_s, r.request_id))
    assert sjf.dispatch_order == ["r0", "r1"] + [r.request_id for r in queued]
    assert sjf.dispatch_order != fcfs.dispatch_order
    mean_e2e = {name: res.summary.e2e_ms.mean for name, res in (("fcfs", fcfs), ("sjf", sjf))}
    assert mean_e2e["sjf"] < mean_e2e["fcfs"]  # shortest-first lowers mean latency


def test_learned_rank_policy_runs_on_simulated_scores():
    ltr = run("ltr")
    assert sorted(ltr.dispatch_order) == sorted(f"r{i}" for i in range(10))
    assert ltr.summary.completed == 10

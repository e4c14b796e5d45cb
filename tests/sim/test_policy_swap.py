"""Swapping the scheduler by name changes the simulated schedule: the
simulator only builds snapshots; the order comes from cluster.policies."""

from pathlib import Path

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
# ten requests at t=0 (closed loop): the first dispatch round sees all of them
# (lengths drawn from the committed Azure sample, whether or not ../shared exists)
BURST = WorkloadSpec(arrival="closed", concurrency=10, num_requests=10, lengths="azure-conv", seed=7,
                     data_dir=Path(__file__).parent / "no-shared-data")


def run(policy: str, starvation_rounds: int = 200):
    cfg = ClusterConfig.from_dict({**CONFIG, "scheduler": {"policy": policy,
                                                           "starvation_rounds": starvation_rounds}})
    return simulate(spec_from_cluster_config(cfg), BURST)


def test_scheduler_policy_by_name_changes_the_schedule():
    # a round runs at every engine step while requests wait: with the default
    # guard (200 rounds) the longest ones would be promoted before their turn
    fcfs, sjf = run("fcfs"), run("sjf-oracle", starvation_rounds=100_000)
    reqs = [t.req for t in fcfs.trackers]
    assert fcfs.dispatch_order == [f"r{i}" for i in range(10)]
    by_length = sorted(reqs, key=lambda r: (r.output_tokens, r.arrival_s, r.request_id))
    assert sjf.dispatch_order == [r.request_id for r in by_length]
    assert [r.output_tokens for r in by_length][:3] == [16, 59, 74]  # seed 7 draws
    assert sjf.dispatch_order != fcfs.dispatch_order
    mean_e2e = {name: res.summary.e2e_ms.mean for name, res in (("fcfs", fcfs), ("sjf", sjf))}
    assert mean_e2e["sjf"] < mean_e2e["fcfs"]  # shortest-first lowers mean latency


def test_learned_rank_policy_runs_on_simulated_scores():
    ltr = run("ltr")
    assert sorted(ltr.dispatch_order) == sorted(f"r{i}" for i in range(10))
    assert ltr.summary.completed == 10


def test_starvation_guard_promotes_a_long_request_passed_over_for_200_rounds():
    sjf = run("sjf-oracle")
    by_length = sorted((t.req for t in sjf.trackers), key=lambda r: r.output_tokens)
    # r0 (396 tokens) waited 200 rounds behind shorter ones: dispatched before r2 (217)
    assert [r.request_id for r in by_length][5:7] == ["r2", "r0"]
    assert sjf.dispatch_order[5:7] == ["r0", "r2"]

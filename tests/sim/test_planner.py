import yaml

from cluster.config import ClusterConfig
from sim.metrics import SLO
from sim.planner import (
    Candidate,
    Instance,
    PlanOptions,
    helm_values,
    mark_pareto,
    plan,
    winner,
    winner_config,
)
from sim.workload import WorkloadSpec


def options(**kw):
    return PlanOptions(model="llama-3.1-8b", dtype="bf16", slo=SLO(2000, 100, 0.9),
                       workload=WorkloadSpec(lengths="fixed", isl=512, osl=64), target_rate=6.0,
                       gpus=["L40S"], tps=[1], modes=["colocated", "disaggregated"],
                       probe_requests=40, verify_requests=100, bisect_steps=3, min_duration_s=5.0, **kw)


def test_plan_finds_a_verified_winner_and_writes_loadable_configs():
    opts = options()
    cands, extra = plan(opts, verify_top=3)
    best = winner(cands)
    assert best is not None and best.verified["meets_slo"]
    assert best.cost_per_hour == min(c.cost_per_hour for c in cands if c.verified and c.verified["meets_slo"])
    cfg = winner_config(opts, best)
    again = ClusterConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert [(p.gpu_type, p.replicas) for p in again.pools] == [(i.gpu, n) for i, n in best.pools]
    values = helm_values(again)
    assert [(p["gpuType"], p["replicas"], p["gpusPerPod"], p["engine"]["tensor_parallel"])
            for p in values["pools"]] == [(i.gpu, n, i.tp, i.tp) for i, n in best.pools]
    assert set(extra["instance_goodput"]) == {"mixed:L40S/tp1", "prefill:L40S/tp1", "decode:L40S/tp1"}


def test_pareto_front_keeps_only_undominated_clusters():
    i = Instance("mixed", "L4", 1)
    cands = [Candidate("colocated", [(i, n)], c, g) for n, c, g in
             ((1, 1.0, 2.0), (2, 2.0, 1.5), (3, 3.0, 5.0), (4, 3.0, 4.0))]
    mark_pareto(cands)
    assert [c.pareto for c in cands] == [True, False, True, False]

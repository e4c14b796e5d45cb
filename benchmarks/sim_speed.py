"""Simulator speed: N requests with the Azure conversation length distribution
on a 16-worker cluster, on one core.

Workload: Poisson arrivals at ``--rate`` req/s, prompt/output lengths sampled
with replacement from AzureLLMInferenceTrace_conv (full trace from
../shared/data when present, else the committed 300-row sample), seed 1.
Cluster: Llama-3.1-8B bf16 on H100-SXM, TP1, the shared BatchPlanner and
BlockManager in every worker; colocated 16 mixed workers, or disaggregated
6 prefill + 10 decode workers.

Reported: ``wall_s`` (the event loop, as ``SimResult.wall_s``), ``cpu_s``
(process time of the whole ``simulate`` call, workload generation
included: what the run cost whatever else the shared machine ran) and the
1-minute load average.

Usage (pin to one core)::

    taskset -c 0 .venv/bin/python benchmarks/sim_speed.py --requests 1000000
    taskset -c 0 .venv/bin/python benchmarks/sim_speed.py --requests 20000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated")
    ap.add_argument("--rate", type=float, default=60.0, help="req/s (about 70%% of capacity)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--exact-steps", action="store_true", help="the planner at every step")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from sim.runner import simulate
    from sim.spec import PoolFlags, cluster_config_from_flags, spec_from_cluster_config
    from sim.workload import WorkloadSpec

    cfg = cluster_config_from_flags("llama-3.1-8b", "bf16", args.mode, PoolFlags("H100", 1, 16),
                                    PoolFlags("H100", 1, 6), PoolFlags("H100", 1, 10),
                                    block_size=args.block_size, max_waiting=100_000)
    spec = spec_from_cluster_config(cfg, dtype="bf16", fast_forward=not args.exact_steps)
    wl = WorkloadSpec(arrival="poisson", rate=args.rate, num_requests=args.requests,
                      lengths="azure-conv", seed=1)
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    cpu0 = time.process_time()
    res = simulate(spec, wl, progress=sys.stderr.isatty())
    cpu_s = time.process_time() - cpu0  # what the run cost this process, whatever else ran
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    s = res.summary
    out = {"requests": args.requests, "mode": args.mode, "rate": args.rate,
           "block_size": args.block_size, "exact_steps": args.exact_steps,
           "wall_s": round(res.wall_s, 2), "cpu_s": round(cpu_s, 2),
           "us_per_request": round(res.wall_s / args.requests * 1e6, 1),
           "cpu_us_per_request": round(cpu_s / args.requests * 1e6, 1),
           "simulated_s": round(s.duration_s, 1), "events": res.events,
           "planner_calls": s.extra["planner_calls"], "windows": s.extra["windows"],
           "steps": s.extra["steps"], "ttft_p50_ms": round(s.ttft_ms.p50, 1),
           "tpot_p50_ms": round(s.tpot_ms.p50, 2), "gpu_utilization": round(s.gpu_utilization, 3),
           "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

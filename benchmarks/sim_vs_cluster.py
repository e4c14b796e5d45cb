"""Simulator against the real disaggregated cluster on this machine.

1. Start the tiny disaggregated cluster (``cluster/examples/tiny-disagg.yaml``:
   one prefill worker, one decode worker, KV over gRPC, the controller, a
   throw-away redis-server) on a local Ray cluster (``sim.cluster_probe``).
2. Calibrate on it, as ``baton sim calibrate --target cluster`` does, on a
   calibration sample of the same load (``--calibration-requests`` requests,
   seed 1; half run just before the measured workload, half just after, as
   the shared machine's background load drifts): engine steps (each prompt's
   prefill, each request's time per token at its mean batch; with
   ``--decode-probes`` also decode batches of 4-16 requests at longer
   contexts, ``sim.cluster_probe.decode_samples``) for the ``cpu`` efficiency
   profile, the KV link, and the control plane's delays.
3. Run the same workload on the real cluster (timestamps at the controller:
   arrival, each token) and in the simulator (the same config on ``cpu``
   hardware, with the measured profile, link and control plane):
   ``--requests`` requests, Poisson at ``--rate``, Azure conversation lengths
   clipped to ``--max-prompt`` / ``--max-output`` tokens, seed 0.
4. Compare p50 and p90 of TTFT and TPOT (targets: p50 within 15%, p90 within
   25%). The load average is recorded before, between and after: the machine
   is shared, and a busy one slows the real cluster, not the simulation.

Usage::

    .venv/bin/python benchmarks/sim_vs_cluster.py                 # calibrate + 200 requests
    .venv/bin/python benchmarks/sim_vs_cluster.py --requests 20 --calibration-requests 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.cluster_probe import (  # noqa: E402
    LocalCluster,
    cluster_timings,
    decode_samples,
    fit_cluster,
    load_samples,
)
from sim.control import cluster_options, save_cluster  # noqa: E402
from sim.engine_profile import compare, sim_timings  # noqa: E402
from sim.latency import PROFILES_PATH, load_profiles, save_profile  # noqa: E402
from sim.runner import simulate  # noqa: E402
from sim.spec import spec_from_cluster_config  # noqa: E402
from sim.workload import WorkloadSpec, build_workload  # noqa: E402

TARGETS = {"p50": 15.0, "p90": 25.0}  # max |error| in percent


def breakdown(runs) -> dict:
    """p50 of the controller's per-request timing fields (where the time went)."""
    import statistics
    keys = ("queue_s", "prefill_queue_s", "prefill_s", "kv_transfer_s")
    return {k: round(statistics.median(r.timing[k] for r in runs) * 1e3, 2) for k in keys}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=1.0, help="req/s (the cluster must keep up)")
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--skip-calibrate", action="store_true", help="use the stored cpu profile")
    ap.add_argument("--calibration-requests", type=int, default=40)
    ap.add_argument("--decode-probes", action="store_true",
                    help="calibrate on decode batches of 4-16 requests too (sim.cluster_probe."
                         "decode_samples): for profiles that simulate batch-heavy loads")
    ap.add_argument("--profiles", type=Path, default=PROFILES_PATH)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict = {"load_avg": {"start": os.getloadavg()}}
    wl = WorkloadSpec(arrival="poisson", rate=args.rate, num_requests=args.requests,
                      lengths="azure-conv", max_prompt_tokens=args.max_prompt,
                      max_output_tokens=args.max_output, seed=0)
    sample = build_workload(replace(wl, num_requests=args.calibration_requests, seed=1)).initial()
    half = len(sample) // 2
    with LocalCluster() as cluster:
        calibrate = not args.skip_calibrate
        if calibrate:
            cluster.run(build_workload(replace(wl, num_requests=2)).initial())  # warm-up
            before = cluster.probe(sample[:half], alone=False)
            batches = decode_samples(cluster) if args.decode_probes else []
            out["load_avg"]["calibrated_before"] = os.getloadavg()
        t0 = time.time()
        real = cluster.run(build_workload(wl).initial())
        out["cluster_wall_s"] = round(time.time() - t0, 1)
        out["load_avg"]["run"] = os.getloadavg()
        if calibrate:
            first = sample[half].arrival_s
            after = cluster.probe([replace(r, arrival_s=r.arrival_s - first)
                                   for r in sample[half:]], alone=False)
        config = cluster.config
    out["load_avg"]["end"] = os.getloadavg()
    if calibrate:
        probes = before + after
        profile, options, report = fit_cluster(
            probes, load_samples([p.run for p in probes]) + batches, config,
            f"a {len(sample)}-request load" + (" and decode batches" if batches else ""))
        save_profile(profile, args.profiles, report)
        save_cluster("cpu", options, report, args.profiles)
        out["calibration"] = report
    spec = spec_from_cluster_config(config, hardware="cpu", **cluster_options("cpu", args.profiles))
    res = simulate(spec, wl, profiles=load_profiles(args.profiles))
    out["comparison"] = compare(cluster_timings(real), sim_timings(res))
    out["real_breakdown_p50_ms"] = breakdown(real)
    out["sim_busy"] = {w.worker_id: round(w.stats.busy_s / res.summary.duration_s, 3)
                       for w in res.workers}
    out["met"] = {k: abs(v["error_pct"]) <= TARGETS[k.split("_")[1]]
                  for k, v in out["comparison"].items()}
    out["workload"] = {"requests": args.requests, "rate": args.rate, "seed": 0,
                       "lengths": f"azure-conv clipped to {args.max_prompt}/{args.max_output}"}
    out["simulated"] = {"control": str(spec.control), "link_gbps": spec.link_bandwidth * 8 / 1e9,
                        "link_latency_ms": spec.link_latency_s * 1e3,
                        "rejected": res.summary.rejected, "preemptions": res.summary.preemptions}
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

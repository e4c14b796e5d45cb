"""Simulator against the real engine on this machine.

1. ``baton sim calibrate`` equivalent: profile ``LLMEngine(tiny)`` step by
   step and fit the ``cpu`` profile (written to sim/data/profiles.json unless
   ``--profiles`` names another file);
2. the same workload — ``--requests`` requests, Poisson arrivals at
   ``--rate``, prompt/output lengths from the Azure conversation trace
   clipped to 512 / 64 tokens, seed 0 — runs on the real in-process engine
   in wall-clock time (``EngineRunner``) and in the simulator on one
   colocated ``cpu`` worker with the engine's limits;
3. p50 and p90 of TTFT and TPOT are compared (targets: p50 within 15%,
   p90 within 25%).

The cluster comparison uses the same code with a ``RealRunner`` for the Ray
cluster (see sim/engine_profile.py) once it exists.

Usage::

    .venv/bin/python benchmarks/sim_vs_engine.py                # calibrate + 200 requests
    .venv/bin/python benchmarks/sim_vs_engine.py --requests 20 --skip-calibrate   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.engine_profile import (  # noqa: E402
    ENGINE_LIMITS,
    EngineRunner,
    calibrate_cpu,
    compare,
    engine_spec,
    sim_timings,
)
from sim.latency import PROFILES_PATH, load_profiles, save_profile  # noqa: E402
from sim.runner import simulate  # noqa: E402
from sim.workload import WorkloadSpec, build_workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--skip-calibrate", action="store_true")
    ap.add_argument("--quick-calibrate", action="store_true")
    ap.add_argument("--profiles", type=Path, default=PROFILES_PATH)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict = {"load_avg_before": os.getloadavg()}
    if not args.skip_calibrate:
        t0 = time.time()
        prof, rep = calibrate_cpu("tiny", quick=args.quick_calibrate)
        save_profile(prof, args.profiles, rep)
        out["calibration"] = {**rep, "wall_s": round(time.time() - t0, 1)}
    wl_spec = WorkloadSpec(arrival="poisson", rate=args.rate, num_requests=args.requests,
                           lengths="azure-conv", max_prompt_tokens=512, max_output_tokens=64, seed=0)
    requests = build_workload(wl_spec).initial()
    t0 = time.time()
    real = EngineRunner("tiny", ENGINE_LIMITS).run(requests)
    out["engine_wall_s"] = round(time.time() - t0, 1)
    res = simulate(engine_spec(ENGINE_LIMITS), wl_spec, profiles=load_profiles(args.profiles))
    out["comparison"] = compare(real, sim_timings(res))
    out["load_avg_after"] = os.getloadavg()
    out["workload"] = {"requests": args.requests, "rate": args.rate,
                       "lengths": "azure-conv clipped to 512/64", "seed": 0}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

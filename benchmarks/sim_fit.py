"""Held-out error of the fitted latency profiles (Splitwise perf_model.csv).

For each seed, the distinct configurations are split 70/30, A100-80GB and
H100 profiles are fitted on the 70% and the median absolute percentage error
of prompt time and of token time is computed on the 30%. Vidur's operator
timings (never fitted on) are predicted as an independent check.

Usage::

    .venv/bin/python benchmarks/sim_fit.py --seeds 0,1,2,3,4,5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.calibration import check_vidur, fit_splitwise  # noqa: E402
from sim.workload import SHARED_DATA  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    args = ap.parse_args()
    path = args.data_dir / "perf" / "splitwise_perf_model.csv"
    if not path.exists():
        print(f"{path} not found", file=sys.stderr)
        return 2
    per_seed, vidur = [], None
    for seed in (int(s) for s in args.seeds.split(",")):
        fits = fit_splitwise(path, 0.3, seed)
        per_seed.append({g: r.as_dict() for g, (_, r) in fits.items()})
        if seed == 0:
            vidur = check_vidur(args.data_dir / "perf" / "vidur", {g: p for g, (p, _) in fits.items()})
    summary = {}
    for gpu in per_seed[0]:
        for key in ("prompt_mdape_test", "token_mdape_test"):
            vals = [s[gpu][key] for s in per_seed]
            summary[f"{gpu}/{key}"] = {"mean": round(statistics.mean(vals), 2),
                                       "min": min(vals), "max": max(vals), "seed0": vals[0]}
    print(json.dumps({"summary": summary, "per_seed": per_seed,
                      "vidur_gemm_check": {k: {"rows": v["rows"], "gemm_mdape": float(v["gemm_mdape"])}
                                           for k, v in (vidur or {}).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

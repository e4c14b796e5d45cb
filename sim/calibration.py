"""Fitting the efficiency profiles of the latency model on measured timings.

Lifecycle:
- GPU profiles (``fit_splitwise``): read the Splitwise measurements
  (``perf_model.csv``: prompt time of a batch of equal prompts, time per
  decode step, Llama-2-70B on A100-80GB and H100 at TP 2/4/8), split the
  distinct configurations into a fitting part and a held-out part (seeded),
  fit the nine factors of ``EfficiencyProfile`` per GPU by least squares on
  log-ratios, and report the held-out median absolute percentage error of
  prompt and token time. ``check_vidur`` then predicts Vidur's operator
  timings (never fitted on) as a second, independent check.
- CPU profile (``baton sim calibrate`` on this machine, ``sim.engine_profile``):
  profile the in-process engine step by step and fit the ``cpu`` profile the
  same way.
- Cluster (``--target cluster``, ``sim.cluster_probe``): start the tiny
  disaggregated cluster locally and measure it: engine steps (the ``cpu``
  profile), the KV link and the control plane's delays (``sim.control``).
The fitted profiles are written to ``sim/data/profiles.json`` (with the
report), read by ``sim.latency.load_profiles``.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from sim.hardware import get_gpu
from sim.latency import PROFILES_PATH, EfficiencyProfile, LatencyModel, save_profile
from sim.models import get_model
from sim.workload import SHARED_DATA

SPLITWISE_HW = {"a100-80gb": "A100-80GB", "h100-80gb": "H100-SXM"}  # pcap rows are derived: skipped
SPLITWISE_MODELS = {"llama2-70b": "llama-2-70b"}  # BLOOM is not a Llama-family architecture

# factor name -> (initial, lower, upper)
PARAMS = {
    "matmul_compute": (0.6, 0.05, 1.0), "matmul_memory": (0.7, 0.05, 1.0),
    "attn_compute": (0.4, 0.02, 1.0), "attn_memory": (0.5, 0.02, 1.0),
    "allreduce": (0.5, 0.02, 1.0), "allreduce_latency_s": (2e-5, 0.0, 1e-3),
    "step_overhead_s": (2e-3, 0.0, 0.2), "layer_overhead_s": (5e-5, 0.0, 5e-3),
    "seq_overhead_s": (1e-4, 0.0, 2e-2), "prefill_seq_overhead_s": (5e-3, 0.0, 0.2),
}
CPU_PARAMS = {**PARAMS, "matmul_compute": (0.5, 0.01, 20.0), "matmul_memory": (0.5, 0.01, 20.0),
              "attn_compute": (0.3, 0.001, 20.0), "attn_memory": (0.3, 0.001, 20.0),
              "allreduce": (1.0, 1.0, 1.0 + 1e-9), "allreduce_latency_s": (0.0, 0.0, 1e-9)}


@dataclass(frozen=True)
class StepSample:
    """One measured step: its shape and how long it took."""

    num_tokens: int
    num_seqs: int
    logit_rows: int
    decode_ctx_sum: int
    prefill_chunks: tuple[tuple[int, int], ...]
    seconds: float
    kind: str  # "prompt" | "token" (which error it counts towards)
    tp: int = 1
    key: str = ""  # the configuration it belongs to (for the held-out split)


# ----- Splitwise measurements ----------------------------------------------------------------------
def load_splitwise(path: Path) -> dict[str, list[StepSample]]:
    """Samples per GPU type: medians over the repeated rows of each configuration."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    with path.open() as fh:
        for r in csv.DictReader(fh):
            if r["hardware"] in SPLITWISE_HW and r["model"] in SPLITWISE_MODELS:
                key = (r["model"], r["hardware"], int(r["tensor_parallel"]), int(r["prompt_size"]),
                       int(r["batch_size"]), int(r["token_size"]))
                groups[key].append(r)
    prompts: dict[tuple, list[float]] = defaultdict(list)
    out: dict[str, list[StepSample]] = defaultdict(list)
    for (model, hw, tp, p, b, ts), rows in sorted(groups.items()):
        gpu = SPLITWISE_HW[hw]
        token_s = statistics.median(float(r["token_time"]) for r in rows) / 1e3
        out[gpu].append(StepSample(b, b, b, b * (p + ts // 2), (), token_s, "token", tp,
                                   f"{model}/{hw}/tp{tp}/p{p}/b{b}/t{ts}"))
        if not (tp == 2 and b == 64):  # anomalous prompt times (see ../shared/data/SOURCES.md)
            prompts[(model, hw, tp, p, b)] += [float(r["prompt_time"]) / 1e3 for r in rows]
    for (model, hw, tp, p, b), times in sorted(prompts.items()):  # prompt time ignores token_size
        # b prompts take b times one prompt's time (b=2 is exactly 2x b=1): the
        # measured system prefills them one after another, so a sample is one prompt
        out[SPLITWISE_HW[hw]].append(StepSample(p, 1, 1, 0, ((p, 0),),
                                                statistics.median(times) / b, "prompt", tp,
                                                f"{model}/{hw}/tp{tp}/p{p}/b{b}"))
    return out


def split_keys(samples: list[StepSample], holdout: float, seed: int) -> tuple[set[str], set[str]]:
    keys = sorted({s.key for s in samples})
    rng = random.Random(seed)
    rng.shuffle(keys)
    n_test = max(1, round(len(keys) * holdout))
    return set(keys[n_test:]), set(keys[:n_test])


# ----- fitting -------------------------------------------------------------------------------------
def predict(samples: list[StepSample], model_name: str, gpu_name: str, dtype: str,
            profile: EfficiencyProfile) -> np.ndarray:
    model, gpu = get_model(model_name), get_gpu(gpu_name)
    lats: dict[int, LatencyModel] = {}
    out = []
    for s in samples:
        lat = lats.get(s.tp) or lats.setdefault(s.tp, LatencyModel(model, gpu, s.tp, dtype, profile))
        out.append(lat.step_time(s.num_tokens, s.num_seqs, s.logit_rows, s.decode_ctx_sum,
                                 s.prefill_chunks))
    return np.array(out)


def fit_profile(samples: list[StepSample], model_name: str, gpu_name: str, dtype: str,
                params: dict = PARAMS, fitted_on: str = "", loss: str = "linear"
                ) -> EfficiencyProfile:
    """Least squares on log(predicted / measured) over ``samples``; ``loss``
    "soft_l1" for timings with outliers (steps slowed by other processes)."""
    from scipy.optimize import least_squares

    names = list(params)
    x0 = np.array([params[n][0] for n in names])
    lo, hi = np.array([params[n][1] for n in names]), np.array([params[n][2] for n in names])
    scale = np.maximum(np.abs(x0), 1e-6)
    measured = np.array([s.seconds for s in samples])

    def profile_of(z):
        return EfficiencyProfile(gpu_name, **dict(zip(names, z * scale, strict=False)), fitted_on=fitted_on)

    def residuals(z):
        return np.log(predict(samples, model_name, gpu_name, dtype, profile_of(z)) / measured)

    best = None
    for start in (x0, (lo + hi) / 2, lo + 0.1 * (hi - lo)):
        r = least_squares(residuals, np.clip(start, lo, hi) / scale, bounds=(lo / scale, hi / scale),
                          method="trf", x_scale="jac", max_nfev=400, loss=loss,
                          f_scale=0.2)
        if best is None or r.cost < best.cost:
            best = r
    return profile_of(best.x)


def ape(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(predicted - measured) / measured * 100


@dataclass(frozen=True)
class FitReport:
    gpu: str
    train_configs: int
    test_configs: int
    prompt_mdape_test: float  # median absolute percentage error, held out
    token_mdape_test: float
    prompt_mdape_train: float
    token_mdape_train: float
    prompt_mape_test: float  # mean absolute percentage error, held out
    token_mape_test: float

    def as_dict(self) -> dict:
        return {f.name: (round(getattr(self, f.name), 3) if isinstance(getattr(self, f.name), float)
                         else getattr(self, f.name)) for f in fields(self)}


def fit_splitwise(path: Path, holdout: float = 0.3, seed: int = 0
                  ) -> dict[str, tuple[EfficiencyProfile, FitReport]]:
    results = {}
    for gpu, samples in load_splitwise(path).items():
        train_keys, test_keys = split_keys(samples, holdout, seed)
        train = [s for s in samples if s.key in train_keys]
        test = [s for s in samples if s.key in test_keys]
        prof = fit_profile(train, "llama-2-70b", gpu, "fp16",
                           fitted_on=f"Splitwise perf_model.csv, Llama-2-70B, {len(train_keys)} "
                                     f"configs (seed {seed}, {holdout:.0%} held out)")
        results[gpu] = (prof, _report(gpu, prof, train, test, len(train_keys), len(test_keys)))
    return results


def _report(gpu, prof, train, test, n_train, n_test) -> FitReport:
    def err(samples, kind, agg):
        chosen = [s for s in samples if s.kind == kind]
        e = ape(predict(chosen, "llama-2-70b", gpu, "fp16", prof), np.array([s.seconds for s in chosen]))
        return float(agg(e))
    return FitReport(gpu, n_train, n_test, err(test, "prompt", np.median), err(test, "token", np.median),
                     err(train, "prompt", np.median), err(train, "token", np.median),
                     err(test, "prompt", np.mean), err(test, "token", np.mean))


# ----- Vidur operator profiles (independent check) ------------------------------------------------------
VIDUR_LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")


def check_vidur(folder: Path, profiles: dict[str, EfficiencyProfile]) -> dict[str, dict]:
    """Median APE of the per-layer GEMM time (QKV + O + up + down) against
    Vidur's measured operator medians, per GPU and model (never fitted on)."""
    out = {}
    for gpu_key, gpu in (("a100", "A100-80GB"), ("h100", "H100-SXM")):
        for model_key, model in (("Llama-2-7b-hf", "llama-2-7b"), ("Llama-2-70b-hf", "llama-2-70b")):
            path = folder / f"{gpu_key}_{model_key}_mlp.csv"
            if not path.exists() or gpu not in profiles:
                continue
            errs = []
            m, g = get_model(model), get_gpu(gpu)
            with path.open() as fh:
                for r in csv.DictReader(fh):
                    tp, n = int(r["num_tensor_parallel_workers"]), int(r["num_tokens"])
                    measured = sum(float(r[f"time_stats.{op}.median"]) for op in VIDUR_LINEAR_OPS) / 1e3
                    lat = LatencyModel(m, g, tp, "fp16", profiles[gpu])
                    o = lat.ops
                    pred = max(n * o.linear_flops_per_token / lat._flop_rate,
                               (o.linear_weight_bytes + n * o.linear_act_bytes_per_token) / lat._mem_rate)
                    errs.append(abs(pred - measured) / measured * 100)
            out[f"{gpu}/{model}"] = {"rows": len(errs), "gemm_mdape": round(statistics.median(errs), 2)}
    return out


# ----- command line ---------------------------------------------------------------------------------
def _calibrate_cluster(args) -> dict:
    """The local tiny disaggregated cluster under a sample of the load that
    benchmarks/sim_vs_cluster.py simulates (Poisson 1 req/s, Azure
    conversation lengths clipped to 512/64, seed 1)."""
    from sim.cluster_probe import LocalCluster, calibrate_cluster
    from sim.control import save_cluster
    from sim.workload import WorkloadSpec, build_workload
    sample = WorkloadSpec(arrival="poisson", rate=1.0, num_requests=20 if args.quick else 40,
                          lengths="azure-conv", max_prompt_tokens=512, max_output_tokens=64,
                          seed=1, data_dir=args.data_dir)
    with LocalCluster() as cluster:
        prof, options, rep = calibrate_cluster(cluster, quick=args.quick,
                                               workload=build_workload(sample).initial(),
                                               decode_probes=args.decode_probes)
    save_profile(prof, args.profiles, rep)
    save_cluster("cpu", options, rep, args.profiles)
    return rep



def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=("cpu", "gpus", "cluster", "all"), default="cpu",
                   help="cpu: profile the in-process engine here; gpus: fit A100/H100 on the "
                        "Splitwise profiles; cluster: measure the local tiny disaggregated "
                        "cluster (steps, KV link, control plane); all: cpu and gpus")
    p.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    p.add_argument("--holdout", type=float, default=0.3, help="share of configurations held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="tiny", help="engine model to profile (cpu)")
    p.add_argument("--quick", action="store_true", help="fewer engine shapes (cpu)")
    p.add_argument("--decode-probes", action="store_true",
                   help="cluster: also time decode batches of 4-16 requests at longer "
                        "contexts (for simulating loads that decode many at once)")
    p.add_argument("--profiles", type=Path, default=PROFILES_PATH, help="where to write the profiles")
    p.add_argument("--json", action="store_true")


def run_calibrate_command(args) -> int:
    import json
    report: dict = {}
    if args.target in ("gpus", "all"):
        path = args.data_dir / "perf" / "splitwise_perf_model.csv"
        if not path.exists():
            print(f"baton sim calibrate: {path} not found (needs ../shared/data)", file=sys.stderr)
            return 2
        fits = fit_splitwise(path, args.holdout, args.seed)
        for gpu, (prof, rep) in fits.items():
            save_profile(prof, args.profiles, rep.as_dict())
            report[gpu] = rep.as_dict()
        vidur = check_vidur(args.data_dir / "perf" / "vidur", {g: p for g, (p, _) in fits.items()})
        report["vidur_check"] = vidur
    if args.target in ("cpu", "all"):
        from sim.engine_profile import calibrate_cpu
        prof, rep = calibrate_cpu(args.model, quick=args.quick, seed=args.seed, holdout=args.holdout)
        save_profile(prof, args.profiles, rep)
        report["cpu"] = rep
    if args.target == "cluster":
        report["cluster"] = _calibrate_cluster(args)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        for name, rep in report.items():
            print(f"{name}: {rep}")
        print(f"profiles written to {args.profiles}")
    return 0

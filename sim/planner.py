"""``baton sim plan``: the cheapest cluster that meets the SLOs.

Lifecycle (DistServe's placement search, OSDI 2024, on the simulator):
1. candidates: every allowed GPU type x TP degree the model fits on, as a
   ``mixed`` instance (colocated) and as ``prefill`` / ``decode`` instances;
2. per-instance goodput: the highest request rate one instance sustains
   with the SLO attainment target, found by bisection on simulated runs —
   mixed: TTFT and TPOT; prefill: TTFT (decode side over-provisioned);
   decode: TPOT, and TTFT within 5x its bound (prefill side over-provisioned,
   so a long TTFT means requests queue for a decode slot). Traces are replayed at a
   rate by Poisson arrivals with the trace's lengths;
3. sizing for the target rate R: colocated ``ceil(R / g_mixed)`` replicas,
   disaggregated ``ceil(R / g_prefill)`` + ``ceil(R / g_decode)``, for every
   pair of prefill and decode instance types;
4. verification: the cheapest sized clusters are simulated whole at R
   (the real trace when one is given); a failing cluster gets one more
   replica on the side that misses (up to three times);
5. output: a table of cost per hour against goodput (the Pareto front is
   marked), the winner as a ``baton serve`` config (YAML) and as values for
   the Helm chart (helm/baton) whose ConfigMap renders that config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import yaml

from cluster.config import ClusterConfig, PoolSpec
from sim.hardware import GPUS, canonical_gpu_name, get_gpu
from sim.latency import kv_blocks_from_memory
from sim.metrics import SLO
from sim.models import get_model
from sim.runner import simulate
from sim.spec import PoolFlags, cluster_config_from_flags, spec_from_cluster_config
from sim.workload import WorkloadSpec, build_workload


@dataclass(frozen=True)
class Instance:
    """One replica type: a GPU type at a TP degree in a role."""

    role: str  # mixed | prefill | decode
    gpu: str
    tp: int

    def price(self, prices: dict[str, float]) -> float:
        return get_gpu(self.gpu, prices).price_per_hour * self.tp


@dataclass
class Candidate:
    """A sized cluster."""

    mode: str  # colocated | disaggregated
    pools: list[tuple[Instance, int]]  # (instance type, replicas)
    cost_per_hour: float
    goodput_req_s: float  # estimated capacity at the SLO (sum of instance goodputs, bottleneck side)
    verified: dict | None = None  # whole-cluster run at the target rate
    pareto: bool = False

    def label(self) -> str:
        return " + ".join(f"{n}x{i.role[0].upper()}:{i.gpu}/tp{i.tp}" for i, n in self.pools)


@dataclass
class PlanOptions:
    model: str
    dtype: str
    slo: SLO
    workload: WorkloadSpec  # lengths (and trace) of the target workload
    target_rate: float  # requests/s to serve
    gpus: list[str]
    tps: list[int]
    modes: list[str]
    prices: dict[str, float] = field(default_factory=dict)
    probe_requests: int = 300  # requests per bisection run (at least)
    verify_requests: int = 600  # requests per whole-cluster run (at least)
    min_duration_s: float = 60.0  # runs last at least this long in arrivals (steady state)
    max_replicas: int = 64
    bisect_steps: int = 7  # bisection steps per instance goodput
    batch: dict = field(default_factory=lambda: {"max_num_seqs": 256, "max_num_batched_tokens": 8192,
                                                 "prefill_chunk_size": 8192})
    log: object = None  # file for progress lines (None = quiet)
    feeder: tuple | None = None  # (prefill instance, its goodput) feeding decode probes


# ----- per-instance goodput ------------------------------------------------------------------
def fits(model_name: str, inst: Instance, dtype: str) -> bool:
    try:
        blocks = kv_blocks_from_memory(get_model(model_name), get_gpu(inst.gpu), inst.tp, dtype, 16)
    except ValueError:
        return False
    return blocks * 16 >= 8192  # room for at least one long request


def _spec(opts: PlanOptions, pools: list[tuple[Instance, int]], slo: SLO):
    roles = {i.role for i, _ in pools}
    flags = {i.role: PoolFlags(i.gpu, i.tp, n) for i, n in pools}
    mode = "colocated" if roles == {"mixed"} else "disaggregated"
    cfg = cluster_config_from_flags(opts.model, opts.dtype, mode, flags.get("mixed"),
                                    flags.get("prefill"), flags.get("decode"),
                                    max_waiting=100_000, **opts.batch)
    return spec_from_cluster_config(cfg, dtype=opts.dtype, prices=opts.prices,
                                    slo=slo), cfg


def _probe_workload(opts: PlanOptions, rate: float, n: int) -> WorkloadSpec:
    w = opts.workload
    n = max(n, int(rate * opts.min_duration_s))
    lengths = w.trace if w.arrival == "trace" else w.lengths
    return replace(w, arrival="poisson", rate=rate, num_requests=n, lengths=lengths, trace=None)


def _attainment(opts: PlanOptions, inst: Instance, rate: float) -> float:
    """SLO attainment of one instance at ``rate`` (the other phase over-provisioned)."""
    slo = opts.slo
    if inst.role == "mixed":
        pools = [(inst, 1)]
    elif inst.role == "prefill":
        pools, slo = [(inst, 1), (Instance("decode", inst.gpu, inst.tp), 4)], replace(slo, tpot_ms=1e9)
    else:  # enough prefill that the decode worker, not the queue, sets the pace
        p_inst, p_goodput = opts.feeder or (Instance("prefill", inst.gpu, inst.tp), 0.0)
        n_p = max(4, math.ceil(1.5 * rate / p_goodput) + 1) if p_goodput > 0 else 4
        # TTFT bound relaxed, not dropped: a saturated decode worker shows as
        # requests queueing before dispatch (its batch cap keeps TPOT low)
        pools, slo = [(p_inst, n_p), (inst, 1)], replace(slo, ttft_ms=5 * slo.ttft_ms)
    spec, _ = _spec(opts, pools, slo)
    res = simulate(spec, _probe_workload(opts, rate, opts.probe_requests))
    return res.summary.slo_attainment


def instance_goodput(opts: PlanOptions, inst: Instance, curve: list | None = None) -> float:
    """Highest rate (req/s) at which one instance meets the attainment target."""
    lo, hi = 0.0, 0.25
    while _record(curve, hi, _attainment(opts, inst, hi)) >= opts.slo.attainment:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            break
    for _ in range(opts.bisect_steps):
        mid = (lo + hi) / 2
        if _record(curve, mid, _attainment(opts, inst, mid)) >= opts.slo.attainment:
            lo = mid
        else:
            hi = mid
    return lo


def _record(curve: list | None, rate: float, attainment: float) -> float:
    if curve is not None:
        curve.append((rate, attainment))
    return attainment


# ----- sizing, verification, Pareto -------------------------------------------------------------
def size_candidates(opts: PlanOptions, goodput: dict[Instance, float]) -> list[Candidate]:
    R, cands = opts.target_rate, []
    for inst, g in goodput.items():
        if inst.role == "mixed" and g > 0:
            n = math.ceil(R / g)
            if n <= opts.max_replicas:
                cands.append(Candidate("colocated", [(inst, n)], n * inst.price(opts.prices), n * g))
    pre = [(i, g) for i, g in goodput.items() if i.role == "prefill" and g > 0]
    dec = [(i, g) for i, g in goodput.items() if i.role == "decode" and g > 0]
    for p, gp in pre:
        for d, gd in dec:
            n_p, n_d = math.ceil(R / gp), math.ceil(R / gd)
            if max(n_p, n_d) <= opts.max_replicas:
                cost = n_p * p.price(opts.prices) + n_d * d.price(opts.prices)
                cands.append(Candidate("disaggregated", [(p, n_p), (d, n_d)], cost,
                                       min(n_p * gp, n_d * gd)))
    return sorted(cands, key=lambda c: (c.cost_per_hour, -c.goodput_req_s, c.label()))


def verify(opts: PlanOptions, cand: Candidate) -> Candidate:
    """Simulate the whole cluster at the target rate; add a replica where it misses."""
    for _ in range(4):
        spec, _ = _spec(opts, cand.pools, opts.slo)
        w = opts.workload
        wl = (replace(w, num_requests=min(w.num_requests, opts.verify_requests)) if w.arrival == "trace"
              else _probe_workload(opts, opts.target_rate, opts.verify_requests))
        s = simulate(spec, wl).summary
        cand.verified = {"slo_attainment": round(s.slo_attainment, 4),
                         "ttft_p90_ms": round(s.ttft_ms.p90, 1), "tpot_p90_ms": round(s.tpot_ms.p90, 2),
                         "goodput_req_s": round(s.goodput_req_s, 3), "meets_slo": s.meets_slo}
        if s.meets_slo:
            return cand
        grow = _bottleneck(cand, s)
        cand.pools = [(i, n + (i.role == grow)) for i, n in cand.pools]
        cand.cost_per_hour = sum(n * i.price(opts.prices) for i, n in cand.pools)
    return cand


def _bottleneck(cand: Candidate, s) -> str:
    if cand.mode == "colocated":
        return "mixed"
    return "prefill" if s.ttft_attainment < s.tpot_attainment else "decode"


def mark_pareto(cands: list[Candidate]) -> None:
    best = -1.0
    for c in sorted(cands, key=lambda c: (c.cost_per_hour, -c.goodput_req_s)):
        c.pareto = c.goodput_req_s > best
        best = max(best, c.goodput_req_s)


def plan(opts: PlanOptions, verify_top: int = 4) -> tuple[list[Candidate], dict]:
    insts = [Instance(role, g, tp) for g in opts.gpus for tp in opts.tps
             for role in _roles(opts.modes) if fits(opts.model, Instance(role, g, tp), opts.dtype)]
    if not insts:
        raise ValueError(f"model {opts.model} fits on none of {opts.gpus} at TP {opts.tps}")
    curves: dict = {}
    goodput = {}
    order = {"mixed": 0, "prefill": 1, "decode": 2}  # decode probes are fed by the best prefill
    for inst in sorted(insts, key=lambda i: order[i.role]):
        if inst.role == "decode" and opts.feeder is None:
            pre = {i: g for i, g in goodput.items() if i.role == "prefill"}
            if pre:
                best = max(pre, key=lambda i: pre[i] / i.price(opts.prices))
                opts.feeder = (best, pre[best])
        curves[inst] = []
        goodput[inst] = instance_goodput(opts, inst, curves[inst])
        _log(opts, f"{inst.role:>7} {inst.gpu}/tp{inst.tp}: {goodput[inst]:.3f} req/s per instance")
    cands = size_candidates(opts, goodput)
    mark_pareto(cands)
    verified = []
    for c in cands[:verify_top]:
        verified.append(verify(opts, c))
        _log(opts, f"verified {c.label()}: {c.verified}")
    return sorted(cands, key=lambda c: (c.cost_per_hour, -c.goodput_req_s, c.label())), \
        {"instance_goodput": {f"{i.role}:{i.gpu}/tp{i.tp}": g for i, g in goodput.items()},
         "curves": {f"{i.role}:{i.gpu}/tp{i.tp}": v for i, v in curves.items()}}


def _roles(modes: list[str]) -> list[str]:
    return (["mixed"] if "colocated" in modes else []) + \
        (["prefill", "decode"] if "disaggregated" in modes else [])


def _log(opts: PlanOptions, line: str) -> None:
    if opts.log is not None:
        print(line, file=opts.log, flush=True)


def winner(cands: list[Candidate]) -> Candidate | None:
    ok = [c for c in cands if c.verified and c.verified["meets_slo"]]
    return min(ok, key=lambda c: (c.cost_per_hour, c.label())) if ok else None


# ----- outputs -----------------------------------------------------------------------------------
def winner_config(opts: PlanOptions, cand: Candidate) -> ClusterConfig:
    _, cfg = _spec(opts, cand.pools, opts.slo)
    model = get_model(opts.model)
    pools = []
    for p, (inst, _) in zip(cfg.pools, cand.pools, strict=False):
        blocks = kv_blocks_from_memory(model, get_gpu(inst.gpu), inst.tp, opts.dtype, p.block_size)
        from sim.latency import kv_bytes_per_token
        kv = blocks * p.block_size * kv_bytes_per_token(model, inst.tp, opts.dtype)
        pools.append(replace(p, kv_cache_bytes=int(kv)))
    slo = replace(cfg.slo, ttft_ms=opts.slo.ttft_ms, tpot_ms=opts.slo.tpot_ms,
                  attainment=opts.slo.attainment)
    return replace(cfg, name="baton-planned", pools=tuple(pools), slo=slo,
                   admission=replace(cfg.admission, max_waiting=1024))


# NVIDIA GPU feature discovery's values of the node label `nvidia.com/gpu.product`
# per catalog GPU (sim.hardware): the chart pins each pool to the nodes of its
# GPU type by them (values `gpuProducts`, whose defaults know other type names).
GPU_PRODUCTS = {
    "A10G": ["NVIDIA-A10G"],
    "L4": ["NVIDIA-L4"],
    "L40S": ["NVIDIA-L40S"],
    "A100-40GB": ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"],
    "A100-80GB": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
    "H100-SXM": ["NVIDIA-H100-80GB-HBM3"],
    "H100-PCIe": ["NVIDIA-H100-PCIe"],
    "H200": ["NVIDIA-H200", "NVIDIA-H200-141GB-HBM3e"],
    "B200": ["NVIDIA-B200"],
}
CHART_PRESETS = ("tiny", "llama-60m")  # model.source names the chart takes without weights
WEIGHTS_MOUNT = "/models"  # chart default model.weights.mountPath
ENGINE_KEYS = ("tensor_parallel", "max_num_batched_tokens", "max_num_seqs",
               "prefill_chunk_size", "kv_cache_bytes", "block_size")  # pools[].engine, as in PoolSpec
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def helm_values(cfg: ClusterConfig, weights_claim: str = "model-weights") -> dict:
    """Values for the chart in helm/baton whose ConfigMap renders ``cfg``.

    Each pool becomes one worker group of ``replicas`` pods, one Baton worker
    per pod holding ``gpusPerPod`` = its GPUs per replica (the TP degree); the
    engine settings go verbatim under ``engine``. A model that is not a chart
    preset is read from ``/models/<name>`` on the claim ``weights_claim``.
    Left to the chart: the cluster name (the release's), Redis, ports and the
    ranker (its defaults are the config's).
    """
    d = cfg.to_dict()
    return {"model": _chart_model(cfg, weights_claim),
            "baton": {"transport": cfg.transport,
                      "scheduler": {k: v for k, v in d["scheduler"].items() if v is not None},
                      "router": d["router"], "admission": d["admission"], "slo": d["slo"]},
            "gpuProducts": {t: _gpu_products(t) for t in dict.fromkeys(p.gpu_type for p in cfg.pools)},
            "pools": [_chart_pool(p) for p in cfg.pools]}


def _chart_model(cfg: ClusterConfig, weights_claim: str) -> dict:
    model = {"source": cfg.model.source, "dtype": cfg.model.dtype,
             "weights": {"volume": "none", "mountPath": WEIGHTS_MOUNT}}
    if cfg.model.source not in CHART_PRESETS:  # a directory under the weights mount
        path = PurePosixPath(cfg.model.source)
        mount = path.parent if path.is_absolute() else PurePosixPath(WEIGHTS_MOUNT)
        model["source"] = str(mount / path.name)
        model["weights"] = {"volume": "pvc", "mountPath": str(mount),
                            "pvc": {"claimName": weights_claim}}
    if cfg.model.max_model_len is not None:
        model["maxModelLen"] = cfg.model.max_model_len
    return model


def _chart_pool(p: PoolSpec) -> dict:
    gpus = int(p.gpus_per_replica)
    if gpus != p.gpus_per_replica:
        raise ValueError(f"pool {p.name}: gpus_per_replica {p.gpus_per_replica:g} is not whole; "
                         "the chart gives each worker whole GPUs")
    engine = {k: getattr(p, k) for k in ENGINE_KEYS} | ({"cpu_kernels": True} if p.cpu_kernels else {})
    pool = {"name": p.name, "role": p.role, "gpuType": p.gpu_type, "replicas": p.replicas,
            "minReplicas": p.replicas, "maxReplicas": p.replicas,
            "gpusPerPod": gpus, "workersPerPod": 1, "engine": engine}
    if gpus:
        pool["tolerations"] = [GPU_TOLERATION]
    return pool


def _gpu_products(gpu_type: str) -> list[str]:
    if gpu_type not in GPU_PRODUCTS:
        raise ValueError(f"GPU type {gpu_type!r} has no known nvidia.com/gpu.product label; "
                         f"known: {', '.join(GPU_PRODUCTS)}")
    return GPU_PRODUCTS[gpu_type]


def format_table(cands: list[Candidate], limit: int = 15) -> str:
    lines = [f"{'cluster':<52}{'$/h':>9}{'goodput':>10}{'$/req/s':>9}  pareto  verified at target"]
    for c in cands[:limit]:
        v = c.verified
        vtxt = "-" if v is None else (f"attain {v['slo_attainment']:.3f} "
                                       f"({'ok' if v['meets_slo'] else 'miss'})")
        lines.append(f"{c.label():<52}{c.cost_per_hour:>9.2f}{c.goodput_req_s:>10.2f}"
                     f"{c.cost_per_hour / max(c.goodput_req_s, 1e-9):>9.2f}  {'*' if c.pareto else ' ':^6}  {vtxt}")
    return "\n".join(lines)


# ----- command line ------------------------------------------------------------------------------------
def add_plan_arguments(p: argparse.ArgumentParser, add_workload_flags) -> None:
    add_workload_flags(p)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--gpus", default="H100-SXM,A100-80GB,L40S",
                   help="comma-separated GPU types allowed (catalog names)")
    p.add_argument("--tps", default="1,2,4,8", help="comma-separated TP degrees to try")
    p.add_argument("--modes", default="colocated,disaggregated")
    p.add_argument("--price", action="append", default=[], help="GPU=USD per hour overrides")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--slo-attainment", type=float, default=0.9)
    p.add_argument("--probe-requests", type=int, default=300)
    p.add_argument("--verify-requests", type=int, default=600)
    p.add_argument("--verify-top", type=int, default=4, help="cheapest candidates simulated whole")
    p.add_argument("--min-duration-s", type=float, default=60.0,
                   help="each probe run spans at least this much arrival time")
    p.add_argument("--bisect-steps", type=int, default=6, help="bisection steps per instance")
    p.add_argument("--out-dir", type=Path, default=Path("sim-plan"),
                   help="writes baton-config.yaml, helm-values.yaml, plan.json and plots here")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true")


def options_from_args(args) -> PlanOptions:
    from sim.cli import build_workload_spec
    prices = {}
    for item in args.price:
        name, _, usd = item.partition("=")
        prices[canonical_gpu_name(name)] = float(usd)
    gpus = [canonical_gpu_name(g.strip()) for g in args.gpus.split(",") if g.strip()]
    wl = build_workload_spec(args)
    rate = args.request_rate
    if args.trace:
        requests = build_workload(wl).initial()
        span = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
        rate = len(requests) / span if span > 0 else None
    if not rate:
        raise ValueError("give --request-rate R or --trace NAME (the rate to plan for)")
    if wl.arrival == "poisson" and wl.lengths == "fixed" and args.lengths is None:
        wl = replace(wl, lengths="fixed")
    return PlanOptions(args.model, args.dtype, SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_attainment),
                       wl, rate, gpus, [int(t) for t in args.tps.split(",")],
                       [m.strip() for m in args.modes.split(",")], prices, args.probe_requests,
                       args.verify_requests, min_duration_s=args.min_duration_s,
                       bisect_steps=args.bisect_steps, log=sys.stderr)


def run_plan_command(args) -> int:
    try:
        opts = options_from_args(args)
        for g in opts.gpus:
            if g not in GPUS:
                raise ValueError(f"unknown GPU {g}")
        cands, extra = plan(opts, args.verify_top)
    except ValueError as exc:
        print(f"baton sim plan: {exc}", file=sys.stderr)
        return 2
    best = winner(cands)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"target_rate_req_s": opts.target_rate, "slo": vars(opts.slo) if hasattr(opts.slo, "__dict__") else None,
              "candidates": [_cand_json(c) for c in cands], "winner": _cand_json(best) if best else None,
              **{k: v for k, v in extra.items() if k != "curves"}}
    (args.out_dir / "plan.json").write_text(json.dumps(report, indent=1))
    if best is not None:
        cfg = winner_config(opts, best)
        (args.out_dir / "baton-config.yaml").write_text(
            "# written by `baton sim plan`; load with `baton serve` / cluster.config.load_config\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _write_helm_values(cfg, args.out_dir / "helm-values.yaml")
    if not args.no_plots:
        from sim.plots import plot_attainment_curves, plot_cost_frontier
        plot_cost_frontier(cands, args.out_dir / "cost_frontier.png", opts.target_rate)
        plot_attainment_curves(extra["curves"], args.out_dir / "slo_attainment_vs_rate.png",
                               opts.slo.attainment)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"target {opts.target_rate:.2f} req/s; SLO p{opts.slo.attainment * 100:.0f}: TTFT <= "
              f"{opts.slo.ttft_ms:g} ms, TPOT <= {opts.slo.tpot_ms:g} ms")
        print(format_table(cands))
        print(f"winner: {best.label()} at ${best.cost_per_hour:.2f}/h" if best else
              "no verified candidate meets the SLO; raise --verify-top or relax the SLO")
        print(f"wrote {args.out_dir}/ (plan.json, baton-config.yaml, helm-values.yaml, plots)")
    return 0 if best else 1


def _write_helm_values(cfg: ClusterConfig, path: Path) -> None:
    try:
        values = helm_values(cfg)
    except ValueError as exc:  # a winner the chart cannot express: the serve config still stands
        print(f"baton sim plan: no {path.name}: {exc}", file=sys.stderr)
        return
    path.write_text(
        "# Helm values for helm/baton written by `baton sim plan`: its ConfigMap renders\n"
        "# baton-config.yaml (`helm install baton helm/baton -f helm-values.yaml`); a model\n"
        "# other than a chart preset is read from /models/<name> on the claim model-weights\n"
        + yaml.safe_dump(values, sort_keys=False))


def _cand_json(c: Candidate | None) -> dict | None:
    if c is None:
        return None
    return {"mode": c.mode, "pools": [{"role": i.role, "gpu": i.gpu, "tp": i.tp, "replicas": n}
                                      for i, n in c.pools],
            "cost_per_hour": round(c.cost_per_hour, 4), "goodput_req_s": round(c.goodput_req_s, 4),
            "pareto": c.pareto, "verified": c.verified}

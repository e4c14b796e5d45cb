"""``baton sim``: run, plan and calibrate from the command line.

Lifecycle: ``add_sim_commands(subparsers)`` registers ``sim run``, ``sim plan``
and ``sim calibrate`` on the ``baton`` parser (``cluster/cli.py``); each
handler validates its flags, does the work, prints a table (or ``--json``),
and returns an exit code: 0 ok, 2 bad input. ``python -m sim.cli ...`` runs
the same commands before the wiring into ``baton`` exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sim.workload import SHARED_DATA, TRACES

SCHEDULERS = ("fcfs", "sjf-oracle", "ltr")
ROUTERS = ("round-robin", "least-loaded", "prefix-aware")


def add_sim_commands(subparsers) -> None:
    sim = subparsers.add_parser("sim", help="simulate a cluster, plan one, calibrate the simulator")
    sub = sim.add_subparsers(dest="sim_command", required=True)
    _add_run(sub)
    _add_plan(sub)
    _add_calibrate(sub)


# ----- shared flags -------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _price(text: str) -> tuple[str, float]:
    name, _, usd = text.partition("=")
    try:
        return name, float(usd)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--price {text!r}: expected GPU=USD, e.g. H100=2.5") from None


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    load = g.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive_int, help="closed loop: requests in flight")
    load.add_argument("--request-rate", type=_positive_float, help="open loop: requests/s")
    load.add_argument("--trace", choices=TRACES, help="replay a trace's arrivals and lengths")
    g.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson",
                   help="arrival process with --request-rate")
    g.add_argument("--cv", type=_positive_float, default=1.0, help="gamma gaps' coefficient of variation")
    g.add_argument("--time-scale", type=_positive_float, default=1.0,
                   help="trace speed-up: timestamps are divided by it")
    g.add_argument("--lengths", choices=("fixed", *TRACES), default=None,
                   help="prompt/output lengths: fixed (--isl/--osl) or sampled from a trace")
    g.add_argument("--isl", type=_positive_int, default=512, help="prompt tokens (fixed lengths)")
    g.add_argument("--osl", type=_positive_int, default=128, help="output tokens (fixed lengths)")
    g.add_argument("--max-prompt-tokens", type=_positive_int, default=None,
                   help="clip longer prompts (traces)")
    g.add_argument("--num-requests", type=_positive_int, default=200)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", type=Path, default=SHARED_DATA,
                   help="folder with the full traces (default: ../shared/data)")


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (ignored with CONFIG.yaml, except the overrides marked so)")
    g.add_argument("--model", default="llama-3.1-8b", help="catalog name or config.json path")
    g.add_argument("--gpu", default="H100", help="GPU type of every pool (catalog name)")
    g.add_argument("--tp", type=_positive_int, default=1, help="tensor parallelism of every pool")
    g.add_argument("--dtype", choices=("bf16", "fp8", "fp16", "fp32"), default=None,
                   help="weights/KV dtype (default bf16; also overrides CONFIG.yaml)")
    g.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated")
    g.add_argument("--replicas", type=_positive_int, default=1, help="colocated replicas")
    g.add_argument("--prefill-gpu"), g.add_argument("--decode-gpu")
    g.add_argument("--prefill-tp", type=_positive_int), g.add_argument("--decode-tp", type=_positive_int)
    g.add_argument("--prefill-replicas", type=_positive_int, default=1)
    g.add_argument("--decode-replicas", type=_positive_int, default=1)
    g.add_argument("--scheduler", choices=SCHEDULERS, default="fcfs")
    g.add_argument("--router", choices=ROUTERS, default="least-loaded")
    g.add_argument("--max-num-seqs", type=_positive_int, default=256)
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192)
    g.add_argument("--prefill-chunk-size", type=_positive_int, default=8192)
    g.add_argument("--block-size", type=_positive_int, default=16)
    g.add_argument("--max-waiting", type=_positive_int, default=1024)
    o = p.add_argument_group("simulation")
    o.add_argument("--hardware", help="run every pool on this catalog entry (e.g. cpu); "
                                      "also overrides CONFIG.yaml")
    o.add_argument("--kv-from", choices=("memory", "config"), default=None,
                   help="KV capacity from GPU memory or from kv_cache_bytes "
                        "(default: config on cpu, else memory)")
    o.add_argument("--link-gbps", type=_positive_float, default=None,
                   help="KV link bandwidth per worker NIC in Gb/s (default: GPU network x TP)")
    o.add_argument("--prefix-caching", action="store_true", help="reuse KV prefix blocks (Mooncake)")
    o.add_argument("--exact-steps", action="store_true",
                   help="call the planner every step (no fast-forwarded decode windows)")
    o.add_argument("--price", type=_price, action="append", default=[], help="GPU=USD per hour")
    o.add_argument("--slo-ttft-ms", type=_positive_float, default=None)
    o.add_argument("--slo-tpot-ms", type=_positive_float, default=None)
    o.add_argument("--slo-attainment", type=_positive_float, default=None)


# ----- sim run ----------------------------------------------------------------------
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="simulate one cluster on one workload")
    p.add_argument("config", nargs="?", help="a `baton serve` CONFIG.yaml (or example name)")
    _add_workload_flags(p)
    _add_cluster_flags(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--plot-dir", type=Path, help="write latency CDF plots (PNG) here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_run)


def build_spec(args):
    """The ``SimSpec`` of ``sim run`` / ``sim plan`` flags (or of CONFIG.yaml)."""
    from cluster.config import load_config
    from sim.metrics import SLO
    from sim.spec import PoolFlags, cluster_config_from_flags, spec_from_cluster_config

    if getattr(args, "config", None):
        cfg = load_config(args.config)
    else:
        pg = PoolFlags(args.prefill_gpu or args.gpu, args.prefill_tp or args.tp, args.prefill_replicas)
        dg = PoolFlags(args.decode_gpu or args.gpu, args.decode_tp or args.tp, args.decode_replicas)
        cfg = cluster_config_from_flags(
            args.model, args.dtype or "bf16", args.mode, PoolFlags(args.gpu, args.tp, args.replicas),
            pg, dg, args.scheduler, args.router, args.max_num_seqs, args.max_num_batched_tokens,
            args.prefill_chunk_size, args.block_size, args.max_waiting)
    slo = SLO(args.slo_ttft_ms or cfg.slo.ttft_ms, args.slo_tpot_ms or cfg.slo.tpot_ms,
              args.slo_attainment or cfg.slo.attainment)
    spec = spec_from_cluster_config(
        cfg, dtype=args.dtype or ("bf16" if not args.config else None), hardware=args.hardware,
        kv_from=args.kv_from, link_bandwidth=args.link_gbps * 1e9 / 8 if args.link_gbps else None,
        prefix_caching=args.prefix_caching, fast_forward=not args.exact_steps,
        prices=dict(args.price), seed=args.seed)
    from dataclasses import replace
    return replace(spec, slo=slo), cfg


def build_workload_spec(args, num_requests: int | None = None, rate: float | None = None):
    from sim.workload import WorkloadSpec

    rate = rate or args.request_rate
    if args.trace:
        arrival = "trace"
    elif args.concurrency:
        arrival = "closed"
    else:
        arrival = args.arrival
    lengths = args.lengths or "fixed"
    return WorkloadSpec(arrival=arrival, rate=rate or 1.0, cv=args.cv,
                        concurrency=args.concurrency or 1,
                        num_requests=num_requests or args.num_requests, lengths=lengths,
                        isl=args.isl, osl=args.osl, trace=args.trace, time_scale=args.time_scale,
                        max_prompt_tokens=args.max_prompt_tokens, seed=args.seed,
                        data_dir=args.data_dir)


def _cmd_run(args) -> int:
    from sim.runner import result_json, simulate

    if not (args.config or args.concurrency or args.request_rate or args.trace):
        print("baton sim run: give CONFIG.yaml or one of --concurrency, --request-rate, --trace",
              file=sys.stderr)
        return 2
    try:
        spec, _ = build_spec(args)
        wl = build_workload_spec(args)
        result = simulate(spec, wl, progress=not (args.json or args.no_progress))
    except ValueError as exc:
        print(f"baton sim run: {exc}", file=sys.stderr)
        return 2
    out = result_json(result)
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        print(format_summary(out, result.wall_s))
    if args.plot_dir:
        from sim.plots import plot_latency_cdfs
        for path in plot_latency_cdfs(result, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def format_summary(s: dict, wall_s: float | None = None) -> str:
    x = s["extra"]
    lines = [f"{x['mode']} {x['model']} ({x['dtype']}): {', '.join(x['pools'])}; "
             f"scheduler {x['scheduler']}, router {x['router']}",
             f"requests {s['num_requests']} completed {s['completed']} rejected {s['rejected']} "
             f"in {s['duration_s']:.1f} s simulated",
             f"{'metric':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key in ("ttft_ms", "tpot_ms", "tbt_max_ms", "e2e_ms"):
        p = s[key]
        lines.append(f"{key:<10}" + "".join(f"{_num(p[q]):>10}" for q in ("mean", "p50", "p90", "p99")))
    slo = s["slo"]
    lines += [
        f"throughput {s['throughput_tok_s']:.1f} output tok/s, {s['request_throughput_req_s']:.3f} req/s",
        f"SLO (TTFT<={slo['ttft_ms']:g} ms, TPOT<={slo['tpot_ms']:g} ms): attainment "
        f"{s['slo_attainment']:.3f} (target {slo['attainment']:g}, "
        f"{'met' if s['meets_slo'] else 'missed'}), goodput {s['goodput_req_s']:.3f} req/s",
        f"GPUs {s['num_gpus']}: utilisation {s['gpu_utilization']:.2f}, MFU {s['mfu']:.3f}; "
        f"cost ${s['cost_per_mtok_usd']:.3f}/M output tok; energy {s['energy_per_token_j']:.2f} J/tok",
    ]
    if wall_s is not None:
        lines.append(f"simulated in {wall_s:.2f} s ({x['events']} events, "
                     f"{x['planner_calls']} planner calls, {x['windows']} decode windows)")
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


# ----- sim plan / calibrate (implemented in sim.planner / sim.calibration) ------------------------
def _add_plan(sub) -> None:
    from sim.planner import add_plan_arguments
    p = sub.add_parser("plan", help="search the cheapest cluster that meets the SLOs")
    add_plan_arguments(p, _add_workload_flags)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    from sim.planner import run_plan_command
    return run_plan_command(args)


def _add_calibrate(sub) -> None:
    from sim.calibration import add_calibrate_arguments
    p = sub.add_parser("calibrate", help="fit efficiency profiles (cpu: profile the engine here)")
    add_calibrate_arguments(p)
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    from sim.calibration import run_calibrate_command
    return run_calibrate_command(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton", description="Baton simulator")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sim_commands(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run", "plan", "calibrate"):
        argv = ["sim", *argv]  # `python -m sim.cli run ...` as well as `... sim run ...`
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

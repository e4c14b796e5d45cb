"""Learning-to-rank scheduling on the real cluster: fcfs vs ltr vs sjf-oracle.

Workload: ``--requests`` prompts of the ShareGPT V3 first-turn *test* split
(split by id hash, ``cluster/ranker/data.py``; data from ../shared/data, see
its SOURCES.md), keeping prompts of at most ``--max-prompt-bytes`` UTF-8
bytes and outputs of 1..``--max-output-tokens`` tokens (the tiny model's
context is 2048), the first N in a fixed hash order. A request's output
length is the original ChatGPT response's length in MiniLM WordPiece tokens
(the ranker's own labels); ``max_tokens`` = that length, greedy, EOS ignored,
so every request generates exactly its true length. Prompts go in as the
tiny model's byte tokens (BOS + UTF-8), so the controller's ranker decodes
them back to the exact text.

Cluster: ``tiny-colocated`` (one mixed worker, ``max_num_seqs`` =
``--max-num-seqs``, 1 torch thread) on a local Ray cluster (2 CPUs) with one
``redis-server``; one ``Deployment`` per policy, run one after the other, each
warmed with one request. Load: a burst (all N submitted at once), or Poisson
arrivals at ``--rate`` requests/s.

Measured per request (client side): end-to-end latency from its submit to
its last token; per-token latency = e2e / output tokens (Fu et al.'s
chatbot metric). Ranker overhead (ltr), two ways:

(a) compute: the encoder's busy seconds (the controller's ``ranker_report``)
    over the run's makespan: CPU time the scoring takes from the cores that
    also serve (here the same 2 cores);
(b) latency: the decode-slot seconds lost while requests waited for their
    scores, per request, over the mean e2e: the integral over time of
    min(free slots, requests queued and not yet scored) (running = from
    dispatch, submit + ``queue_s``, to the last token), over the number of
    requests. A request waiting for its score while every slot is busy loses
    nothing: it could not have run anyway. (A request waits for its score at
    most ``scheduler.score_wait_s``, ``--score-wait-s``; then it is
    dispatchable, after every scored one; ``dispatched_unscored`` counts
    those that ran before their score came.)

The target (<= 2%) is judged on (a), the larger one; (b) is what a user
sees. Beside the runs, the encoder's own cost on the workload's prompts is
timed in the benchmark's process on one thread, int8 (served) against fp32
(the reference), with the load average.

Simulator: the same requests (prompt = bytes + 1 tokens, same output
lengths, same arrival times) on a colocated ``cpu`` worker of the ``tiny``
model through sim's public API (``Simulation``, ``Workload``,
``spec_from_cluster_config`` of the very config the cluster ran). The
simulator's ranker is its own log-normal-noise model; ``ranker_noise`` is set
by bisection so that its Kendall's tau on these requests equals the real
ranker's measured tau, and its scores come back after the real ranker's
measured busy time per prompt (``sim/ranker.py``), so that requests are
dispatched unscored while the burst is being scored, as on the cluster.
``--profiles FILE`` simulates with other efficiency profiles than the
committed ones. This burst decodes 8 requests at once with contexts up to
~2,000 tokens; the committed ``cpu`` profile has seen such batches since it
is calibrated with decode probes (``baton sim calibrate --target cluster
--decode-probes``, which writes it).

Usage::

    .venv/bin/python benchmarks/ltr_serving_bench.py --json benchmarks/out/ltr_serving.json
    .venv/bin/python benchmarks/ltr_serving_bench.py --requests 40 --max-output-tokens 64  # smoke
    .venv/bin/python benchmarks/ltr_serving_bench.py --sweep  # slots vs ratio, no cluster
    # the simulator half again for a saved run, with other profiles (no cluster):
    .venv/bin/python benchmarks/ltr_serving_bench.py --resimulate benchmarks/out/ltr_serving.json \
        --profiles FILE
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench_common import emit_report

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20
POLICIES = ("fcfs", "ltr", "sjf-oracle")
TARGET_FCFS_OVER_LTR = 2.0
TARGET_LTR_OVER_ORACLE = 1.25
TARGET_SIM_RATIO_ERR = 0.20
TARGET_OVERHEAD = 0.02


# ----- workload -------------------------------------------------------------------------
def test_split(data: list[Path] | None) -> list:
    """The ranker's test split, in a fixed hash order."""
    from cluster.ranker.data import by_split, hash_order, load_examples

    return sorted(by_split(load_examples(data))["test"], key=lambda e: hash_order(e.id))


def workload(test: list, n: int, max_prompt_bytes: int, max_output_tokens: int):
    keep = [e for e in test if len(e.prompt.encode()) <= max_prompt_bytes
            and 1 <= e.output_tokens <= max_output_tokens]
    if len(keep) < n:
        raise SystemExit(f"only {len(keep)} test prompts fit the limits; --requests {n}")
    return keep[:n]


def arrival_offsets(n: int, rate: float | None, seed: int) -> list[float]:
    if rate is None:
        return [0.0] * n
    import random
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ----- the real cluster ------------------------------------------------------------------------
def make_config(policy: str, redis_url: str, tag: str, max_num_seqs: int, n: int,
                head: Path | None = None, score_wait_s: float | None = None):
    from cluster.config import load_config

    cfg = load_config("tiny-colocated")
    pools = tuple(replace(p, max_num_seqs=max_num_seqs, kv_cache_bytes=256 * MIB)
                  for p in cfg.pools)
    name = f"ltr-bench-{policy}-{tag}"
    return replace(cfg, name=name, pools=pools,
                   scheduler=replace(cfg.scheduler, policy=policy, score_wait_s=(
                       cfg.scheduler.score_wait_s if score_wait_s is None else score_wait_s)),
                   admission=replace(cfg.admission, max_waiting=max(1024, 2 * n)),
                   redis=replace(cfg.redis, url=redis_url, namespace=name),
                   ranker=replace(cfg.ranker, head_path=str(head)) if head else cfg.ranker)


async def one_request(client, rid: str, prompt: list[int], max_tokens: int, delay_s: float):
    from workers.sampling import SamplingParams

    await asyncio.sleep(delay_s)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    n, last = 0, None
    async for chunk in client.generate(prompt, params, request_id=rid):
        n += len(chunk.token_ids)
        last = chunk
    return {"id": rid, "e2e_s": time.perf_counter() - t0, "submit_s": t0,
            "end_s": time.perf_counter(), "tokens": n, "timing": dict(last.timing)}


async def run_policy(cfg, prompts, lengths, offsets) -> dict:
    import ray

    from cluster.ray_client import ClusterClient

    client = ClusterClient(cfg.name)
    ctl = await client.controller()
    await one_request(client, "warmup", prompts[0], 4, 0.0)
    before = await ctl.ranker_report.remote()
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one_request(client, f"q{i}", p, m, d) for i, (p, m, d)
                                  in enumerate(zip(prompts, lengths, offsets, strict=True))))
    makespan = max(r["end_s"] for r in runs) - t0
    after = await ctl.ranker_report.remote()
    for r, want in zip(runs, lengths, strict=True):
        r["end_s"] -= t0
        r["submit_s"] -= t0
        if r["tokens"] != want:
            raise RuntimeError(f"{cfg.name} {r['id']}: {r['tokens']} tokens, want {want}")
    del ray
    return {"runs": runs, "makespan_s": makespan, "ranker_before": before, "ranker_after": after}


def free_slot_wait(runs: list[dict], slots: int) -> float:
    """(b): slot-seconds lost to waiting for scores, per request: the integral
    over time of min(free slots, requests queued unscored), over the number of
    requests. A free slot can take one waiting request; a request waiting for
    its score while every slot is busy loses nothing."""
    events = []  # (time, change in running, change in queued-unscored)
    for r in runs:
        dispatch = r["submit_s"] + r["timing"]["queue_s"]
        events += [(dispatch, 1, 0), (r["end_s"], -1, 0), (r["submit_s"], 0, 1),
                   (r["submit_s"] + min(score_wait(r), r["timing"]["queue_s"]), 0, -1)]
    events.sort()
    lost, running, unscored = 0.0, 0, 0
    for (t, d_run, d_wait), (t_next, _, _) in zip(events, events[1:] + events[-1:], strict=True):
        running, unscored = running + d_run, unscored + d_wait
        lost += min(max(slots - running, 0), unscored) * (t_next - t)
    return lost / len(runs)


def score_wait(run: dict) -> float:
    """Submit to score; a request that finished before its score came back
    has no ``rank_s`` in its timing: it waited for the score all along."""
    return run["timing"].get("rank_s", float("inf"))


def summarize(policy: str, res: dict, lengths: list[int], slots: int) -> dict:
    e2e = [r["e2e_s"] for r in res["runs"]]
    per_tok = [r["e2e_s"] / n for r, n in zip(res["runs"], lengths, strict=True)]
    row = {"policy": policy, "n": len(e2e), "e2e_mean_s": statistics.fmean(e2e),
           "e2e_p50_s": pct(e2e, 0.5), "e2e_p90_s": pct(e2e, 0.9),
           "per_token_mean_s": statistics.fmean(per_tok), "makespan_s": res["makespan_s"],
           "queue_mean_s": statistics.fmean(r["timing"].get("queue_s", 0.0) for r in res["runs"])}
    a, b = res["ranker_after"], res["ranker_before"]
    if a is not None:
        ranks = [r["timing"]["rank_s"] for r in res["runs"] if "rank_s" in r["timing"]]
        busy = a["busy_s"] - (b["busy_s"] if b else 0.0)
        lost = free_slot_wait(res["runs"], slots)
        cpu = a.get("cpu_s", 0.0) - (b.get("cpu_s", 0.0) if b else 0.0)
        row.update({"ranker_busy_s": busy, "ranker_cpu_s": cpu, "ranker_batches": a["batches"] - (b["batches"] if b else 0),
                    "ranker_largest_batch": a["largest_batch"],
                    "ranker_precision": a.get("precision"),
                    "rank_mean_s": statistics.fmean(ranks) if ranks else None,
                    "dispatched_unscored": sum(score_wait(r) > r["timing"]["queue_s"]
                                               for r in res["runs"]),
                    "free_slot_wait_mean_s": lost,
                    "overhead_busy_share": busy / res["makespan_s"],
                    "overhead_cpu_share": cpu / res["makespan_s"],
                    "overhead_latency_share": lost / row["e2e_mean_s"],
                    "overhead_rank_share": (statistics.fmean(ranks) / row["e2e_mean_s"]
                                            if ranks else None),
                    "online_tau": a["online_tau"]})
    return row


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def time_encoder(prompts: list[str], repeats: int = 3, head: Path | None = None) -> dict:
    """Seconds to score ``prompts`` on one torch thread, served int8 against
    the fp32 reference, interleaved; the best of ``repeats`` each."""
    import torch

    from cluster.ranker.ranker import Ranker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rankers = {p: Ranker.load(head, precision=p) for p in ("int8", "fp32")}
    best = dict.fromkeys(rankers, float("inf"))
    load = os.getloadavg()[0]
    for _ in range(repeats):
        for p, r in rankers.items():
            t0 = time.perf_counter()
            r.score(prompts)
            best[p] = min(best[p], time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {"prompts": len(prompts), "threads": 1, "best_s": best, "load_avg_1m": load}


# ----- the simulator on the same workload ------------------------------------------------------
def simulate_policy(cfg, prompt_tokens, lengths, offsets, noise: float, profiles=None,
                    prompt_s: float = 0.0):
    """``prompt_s``: the ranker's scoring seconds per prompt (0: scored on arrival)."""
    from sim.core import Simulation
    from sim.spec import spec_from_cluster_config
    from sim.workload import Request, Workload, WorkloadSpec

    spec = spec_from_cluster_config(cfg, hardware="cpu", ranker_noise=noise,
                                    ranker_prompt_s=prompt_s)
    reqs = [Request(i, t, p, n) for i, (t, p, n) in
            enumerate(zip(offsets, prompt_tokens, lengths, strict=True))]
    wl = Workload(WorkloadSpec(num_requests=len(reqs)), reqs, closed=False)
    return Simulation(spec, wl, profiles=profiles).run()


def sim_tau(cfg, prompt_tokens, lengths, offsets, noise: float) -> float:
    from cluster.ranker.evaluate import kendall_tau

    res = simulate_policy(replace(cfg, scheduler=replace(cfg.scheduler, policy="fcfs")),
                          prompt_tokens, lengths, offsets, noise)
    return kendall_tau([t.score for t in res.trackers], [t.req.output_tokens for t in res.trackers])


def noise_for_tau(cfg, prompt_tokens, lengths, offsets, tau: float) -> float:
    """Bisection: the simulated ranker's noise giving the measured tau."""
    lo, hi = 0.0, 8.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if sim_tau(cfg, prompt_tokens, lengths, offsets, mid) > tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sim_report(cfgs: dict, prompt_tokens, lengths, offsets, tau: float, real: dict,
               profiles_path: Path | None) -> dict:
    """The same burst in the simulator, its ranker's noise set to the real tau
    and its scoring time per prompt to the real ranker's (busy seconds over
    prompts in the ltr run); ``real`` = the cluster's rows by policy."""
    from sim.latency import load_profiles

    profiles = load_profiles(profiles_path) if profiles_path else None
    noise = noise_for_tau(cfgs["fcfs"], prompt_tokens, lengths, offsets, tau)
    prompt_s = real["ltr"].get("ranker_busy_s", 0.0) / len(lengths)
    srows = sim_rows(cfgs, prompt_tokens, lengths, offsets, noise, profiles, prompt_s)
    for r in srows:
        r["sim_over_real_mean"] = r["e2e_mean_s"] / real[r["policy"]]["e2e_mean_s"]
    sby = {r["policy"]: r for r in srows}
    real_ratio = real["fcfs"]["e2e_mean_s"] / real["ltr"]["e2e_mean_s"]
    simr = sby["fcfs"]["e2e_mean_s"] / sby["ltr"]["e2e_mean_s"]
    return {"ranker_noise": noise, "ranker_prompt_s": prompt_s,
            "profiles": str(profiles_path or "committed"), "rows": srows,
            "fcfs_over_ltr_mean": simr, "relative_error": abs(simr - real_ratio) / real_ratio}


def sim_rows(cfgs: dict, prompt_tokens, lengths, offsets, noise: float,
             profiles=None, prompt_s: float = 0.0) -> list[dict]:
    rows = []
    for policy, cfg in cfgs.items():
        res = simulate_policy(cfg, prompt_tokens, lengths, offsets, noise, profiles, prompt_s)
        e2e = [t.finish_s - t.req.arrival_s for t in res.trackers]
        rows.append({"policy": policy, "e2e_mean_s": statistics.fmean(e2e),
                     "e2e_p90_s": pct(e2e, 0.9),
                     "per_token_mean_s": statistics.fmean(
                         x / n for x, n in zip(e2e, lengths, strict=True))})
    return rows


# ----- which configuration could reach the target? (no cluster) ------------------------------
def slot_model_mean(lengths: list[int], order: list[int], slots: int) -> float:
    """Mean completion time of a burst served in ``order`` on ``slots``
    identical slots, each request holding one for its length (time unit: one
    token)."""
    import heapq

    free_at, done = [0.0] * slots, []
    for i in order:
        t = heapq.heappop(free_at) + lengths[i]
        done.append(t)
        heapq.heappush(free_at, t)
    return statistics.fmean(done)


def sweep(examples, scores: list[float], slot_counts=(1, 2, 4, 8, 16)) -> list[dict]:
    """fcfs/sjf and fcfs/ltr (the shipped head's real scores) in the slot
    model, and in the simulator with those scores replayed, per slot count."""
    lengths = [e.output_tokens for e in examples]
    n = range(len(lengths))
    orders = {"fcfs": list(n), "sjf": sorted(n, key=lengths.__getitem__),
              "ltr": sorted(n, key=lambda i: -scores[i])}
    rows = []
    for k in slot_counts:
        m = {p: slot_model_mean(lengths, o, k) for p, o in orders.items()}
        row = {"slots": k, "model_fcfs_over_sjf": m["fcfs"] / m["sjf"],
               "model_fcfs_over_ltr": m["fcfs"] / m["ltr"], "model_ltr_over_sjf": m["ltr"] / m["sjf"]}
        if k in (2, 4, 8):
            sim = {p: replayed_sim_mean(examples, scores, p, k) for p in POLICIES}
            row.update({"sim_fcfs_over_sjf": sim["fcfs"] / sim["sjf-oracle"],
                        "sim_fcfs_over_ltr": sim["fcfs"] / sim["ltr"],
                        "sim_ltr_over_sjf": sim["ltr"] / sim["sjf-oracle"]})
        rows.append(row)
    return rows


def replayed_sim_mean(examples, scores: list[float], policy: str, slots: int) -> float:
    """Simulated mean e2e of the burst, the ltr policy seeing the real scores."""
    from sim.core import Simulation
    from sim.spec import spec_from_cluster_config
    from sim.workload import Request, Workload, WorkloadSpec

    class Replayed(Simulation):  # the simulated ranker's score replaced by the real one
        def _push_arrival(self, req, on_arrival=None):
            super()._push_arrival(req, on_arrival)
            self.trackers[-1].score = scores[req.index]

    cfg = make_config(policy, "redis://unused", "sweep", slots, len(examples))
    reqs = [Request(i, 0.0, len(e.prompt.encode()) + 1, e.output_tokens)
            for i, e in enumerate(examples)]
    res = Replayed(spec_from_cluster_config(cfg, hardware="cpu"),
                   Workload(WorkloadSpec(num_requests=len(reqs)), reqs, closed=False)).run()
    return statistics.fmean(t.finish_s - t.req.arrival_s for t in res.trackers)


def burst_bound(lengths: list[int]) -> float:
    """fcfs/sjf-oracle mean completion of one burst on one slot. Shortest
    first minimizes mean completion on identical parallel slots (Conway,
    Maxwell and Miller, *Theory of Scheduling*, 1967), so no order of the
    burst beats this ratio on one slot; on this data more slots lower it
    (the sweep's rows)."""
    n = range(len(lengths))
    return (slot_model_mean(lengths, list(n), 1)
            / slot_model_mean(lengths, sorted(n, key=lengths.__getitem__), 1))


def print_sweep(rows: list[dict], tau: float, n: int, split_lengths: list[int]) -> None:
    print(f"whole test split as one burst (n={len(split_lengths)}, every output of >= 1 token): "
          f"slot model fcfs/sjf-oracle on one slot {burst_bound(split_lengths):.2f} "
          "(no order of the burst does better in the slot model)")
    print(f"burst of {n}, shipped head's tau {tau:.3f}: mean e2e ratios by slots per worker")
    for r in rows:
        sim = (f"; simulator fcfs/sjf {r['sim_fcfs_over_sjf']:.2f} fcfs/ltr "
               f"{r['sim_fcfs_over_ltr']:.2f} ltr/sjf {r['sim_ltr_over_sjf']:.2f}"
               if "sim_fcfs_over_ltr" in r else "")
        print(f"  {r['slots']:>2} slots: slot model fcfs/sjf {r['model_fcfs_over_sjf']:.2f} "
              f"fcfs/ltr {r['model_fcfs_over_ltr']:.2f} ltr/sjf {r['model_ltr_over_sjf']:.2f}{sim}")


# ----- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-prompt-bytes", type=int, default=1024)
    ap.add_argument("--max-output-tokens", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals (default: a burst)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--data", type=Path, nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--profiles", type=Path, default=None,
                    help="efficiency profiles for the simulator (default: the committed ones)")
    ap.add_argument("--resimulate", type=Path, default=None, metavar="REPORT.json",
                    help="no cluster: the simulator half again for a saved report's real runs "
                         "(with --profiles, e.g. one calibrated with decode probes)")
    ap.add_argument("--head", type=Path, default=None,
                    help="ranker head for ltr (default: the shipped one)")
    ap.add_argument("--score-wait-s", type=float, default=None,
                    help="ltr: longest wait for a request's score before dispatch "
                         "(default: the config's scheduler.score_wait_s)")
    ap.add_argument("--sweep", action="store_true",
                    help="no cluster: ratios by slot count in the slot model and the simulator, "
                         "with the shipped head's real scores")
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write JSON to this file ('-' or no value: stdout)")
    args = ap.parse_args(argv)

    import ray

    from cluster.launcher import Deployment
    from cluster.ranker.evaluate import rank_quality
    from cluster.ranker.ranker import Ranker
    from cluster.redis_server import RedisServer

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json == "-" else \
        (lambda *a: print(*a, flush=True))
    t_start, load_start = time.perf_counter(), os.getloadavg()
    test = test_split(args.data)
    examples = workload(test, args.requests, args.max_prompt_bytes, args.max_output_tokens)
    prompts = [[256, *e.prompt.encode()] for e in examples]
    lengths = [e.output_tokens for e in examples]
    offsets = arrival_offsets(len(examples), args.rate, args.seed)
    if args.resimulate:
        return resimulate(args.resimulate, examples, prompts, lengths, offsets, args)
    if args.sweep:
        scores = Ranker.load(args.head).score([e.prompt for e in examples])
        split = [e.output_tokens for e in test if e.output_tokens >= 1]
        print_sweep(sweep(examples, scores), rank_quality(scores, lengths).kendall_tau,
                    len(examples), split)
        return 0
    encoder_cost = time_encoder([e.prompt for e in examples], head=args.head)
    ranker = Ranker.load(args.head)
    quality = rank_quality(ranker.score([e.prompt for e in examples]), lengths)
    del ranker
    say(f"{len(examples)} requests, {sum(lengths)} output tokens; shipped head on them: "
        f"tau {quality.kendall_tau:.3f}, pairwise {quality.pairwise_accuracy:.3f}; encoder on "
        f"one thread: " + ", ".join(f"{p} {v:.2f} s" for p, v in encoder_cost["best_s"].items())
        + f" (load {encoder_cost['load_avg_1m']:.2f})")
    policies = args.policies.split(",")
    tag = str(os.getpid())
    rows, cfgs, per_request = [], {}, {}
    with RedisServer() as redis_server:
        ray.init(address="local", num_cpus=2, resources={"gpu_type:H100": 4},
                 object_store_memory=256 * MIB, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            for policy in policies:
                cfg = cfgs[policy] = make_config(policy, redis_server.url, tag,
                                                 args.max_num_seqs, len(examples), args.head,
                                                 args.score_wait_s)
                dep = Deployment(cfg).start()
                try:
                    res = asyncio.run(run_policy(cfg, prompts, lengths, offsets))
                finally:
                    dep.shutdown()
                rows.append(summarize(policy, res, lengths, args.max_num_seqs))
                per_request[policy] = [
                    {"id": r["id"], "output_tokens": n, "e2e_s": round(r["e2e_s"], 3),
                     "submit_s": round(r["submit_s"], 4), "end_s": round(r["end_s"], 3),
                     **{k: round(v, 4) for k, v in r["timing"].items()
                        if k in ("queue_s", "rank_s", "ttft_s")}}
                    for r, n in zip(res["runs"], lengths, strict=True)]
                say(f"  {policy}: mean e2e {rows[-1]['e2e_mean_s']:.1f} s, p90 "
                    f"{rows[-1]['e2e_p90_s']:.1f} s, makespan {res['makespan_s']:.0f} s")
        finally:
            ray.shutdown()
    by = {r["policy"]: r for r in rows}
    report = {"benchmark": "ltr_serving", "date": time.strftime("%Y-%m-%d"),
              "machine": f"CPU, {os.cpu_count()} cores, no GPU ({platform.machine()})",
              "requests": len(examples), "output_tokens": sum(lengths),
              "arrivals": "burst" if args.rate is None else f"poisson {args.rate}/s",
              "max_num_seqs": args.max_num_seqs,
              "score_wait_s": next(iter(cfgs.values())).scheduler.score_wait_s, "limits": {
                  "max_prompt_bytes": args.max_prompt_bytes,
                  "max_output_tokens": args.max_output_tokens},
              "ranker_on_workload": quality.to_json(), "encoder_cost": encoder_cost,
              "load_avg_start": load_start, "rows": rows,
              "command": "python benchmarks/ltr_serving_bench.py " + " ".join(sys.argv[1:])}
    if {"fcfs", "ltr", "sjf-oracle"} <= set(by):
        report["ratios"] = {
            "fcfs_over_ltr_mean": by["fcfs"]["e2e_mean_s"] / by["ltr"]["e2e_mean_s"],
            "ltr_over_oracle_mean": by["ltr"]["e2e_mean_s"] / by["sjf-oracle"]["e2e_mean_s"],
            "fcfs_over_oracle_mean": by["fcfs"]["e2e_mean_s"] / by["sjf-oracle"]["e2e_mean_s"],
            "fcfs_over_ltr_per_token": by["fcfs"]["per_token_mean_s"] / by["ltr"]["per_token_mean_s"]}
    if not args.skip_sim and "fcfs" in by and "ltr" in by:
        report["sim"] = sim_report(cfgs, [len(p) for p in prompts], lengths, offsets,
                                   quality.kendall_tau, by, args.profiles)
    report["load_avg_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t_start
    report["per_request"] = per_request
    emit_report(report, args.json, print_tables)
    return 0


def resimulate(path: Path, examples, prompts, lengths, offsets, args) -> int:
    import json

    saved = json.loads(path.read_text())
    if saved["requests"] != len(examples) or saved["output_tokens"] != sum(lengths):
        raise SystemExit(f"{path}: another workload ({saved['requests']} requests, "
                         f"{saved['output_tokens']} tokens); give the same --requests and limits")
    by = {r["policy"]: r for r in saved["rows"]}
    # reports from before scheduler.score_wait_s dispatched unscored requests at once
    wait = args.score_wait_s if args.score_wait_s is not None else saved.get("score_wait_s", 0.0)
    cfgs = {p: make_config(p, "redis://unused", "resim", saved["max_num_seqs"], len(examples),
                           score_wait_s=wait) for p in by}
    sim = sim_report(cfgs, [len(p) for p in prompts], lengths, offsets,
                     saved["ranker_on_workload"]["kendall_tau"], by, args.profiles)
    emit_report({"resimulated": str(path), "score_wait_s": wait, "sim": sim}, args.json,
                lambda r: print_resimulated(r["sim"], by))
    return 0


def print_resimulated(sim: dict, real: dict) -> None:
    for r in sim["rows"]:
        print(f"{r['policy']:<11} simulated mean e2e {r['e2e_mean_s']:6.1f} s, real "
              f"{real[r['policy']]['e2e_mean_s']:6.1f} s, sim/real {r['sim_over_real_mean']:.2f}")
    print(f"fcfs/ltr simulated {sim['fcfs_over_ltr_mean']:.2f}, real "
          f"{real['fcfs']['e2e_mean_s'] / real['ltr']['e2e_mean_s']:.2f}, off by "
          f"{sim['relative_error']:.1%} (profiles: {sim['profiles']})")


def print_tables(report: dict) -> None:
    q = report["ranker_on_workload"]
    print(f"\nLearning-to-rank scheduling: {report['requests']} ShareGPT test prompts "
          f"({report['arrivals']}), {report['output_tokens']} output tokens, tiny model, "
          f"max_num_seqs {report['max_num_seqs']}; ranker tau on them {q['kendall_tau']:.3f}")
    head = (f"{'policy':<11} {'mean e2e s':>10} {'p50':>7} {'p90':>7} {'per-token ms':>12} "
            f"{'makespan s':>10} {'rank s':>7} {'(a) busy':>9} {'(b) wait':>9}")
    print(head + "\n" + "-" * len(head))
    for r in report["rows"]:
        rank = f"{r['rank_mean_s']:.2f}" if r.get("rank_mean_s") is not None else "-"
        busy = f"{r['overhead_busy_share']:.1%}" if "overhead_busy_share" in r else "-"
        wait = f"{r['overhead_latency_share']:.2%}" if "overhead_latency_share" in r else "-"
        print(f"{r['policy']:<11} {r['e2e_mean_s']:>10.1f} {r['e2e_p50_s']:>7.1f} "
              f"{r['e2e_p90_s']:>7.1f} {r['per_token_mean_s'] * 1e3:>12.1f} "
              f"{r['makespan_s']:>10.0f} {rank:>7} {busy:>9} {wait:>9}")
    for r in report["rows"]:
        if "ranker_busy_s" in r:
            print(f"ranker ({r['ranker_precision']}): busy {r['ranker_busy_s']:.1f} s "
                  f"(CPU {r['ranker_cpu_s']:.1f} s = {r['overhead_cpu_share']:.1%} of the makespan) in "
                  f"{r['ranker_batches']} encoder calls; free-slot wait {r['free_slot_wait_mean_s']:.3f}"
                  f" s a request; {r['dispatched_unscored']} dispatched before their score "
                  f"(overhead target <= {TARGET_OVERHEAD:.0%}, judged on (a))")
    c = report["encoder_cost"]
    print(f"encoder on {c['prompts']} prompts, 1 thread, load {c['load_avg_1m']:.2f}: " + ", ".join(
        f"{p} {v:.2f} s" for p, v in c["best_s"].items()))
    if "ratios" in report:
        x = report["ratios"]
        print(f"mean e2e fcfs/ltr {x['fcfs_over_ltr_mean']:.2f} (target >= "
              f"{TARGET_FCFS_OVER_LTR}); ltr/sjf-oracle {x['ltr_over_oracle_mean']:.2f} (target <= "
              f"{TARGET_LTR_OVER_ORACLE}); fcfs/sjf-oracle {x['fcfs_over_oracle_mean']:.2f}; "
              f"per-token fcfs/ltr {x['fcfs_over_ltr_per_token']:.2f}")
    if "sim" in report:
        s = report["sim"]
        print(f"simulator (ranker_noise {s['ranker_noise']:.2f}, scoring "
              f"{1e3 * s.get('ranker_prompt_s', 0.0):.1f} ms a prompt): " + ", ".join(
            f"{r['policy']} {r['e2e_mean_s']:.1f} s" for r in s["rows"])
              + f"; fcfs/ltr {s['fcfs_over_ltr_mean']:.2f}, off by {s['relative_error']:.1%} "
              f"(target <= {TARGET_SIM_RATIO_ERR:.0%})")
    print(f"wall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())

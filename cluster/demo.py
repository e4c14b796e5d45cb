"""``baton demo``: the disaggregated tiny cluster on a local Ray cluster.

Lifecycle: start a ``redis-server`` and a local Ray cluster whose nodes offer
emulated GPU types; draw 64 requests from the Azure conversation trace (the
full file from ../shared/data when present, else the committed sample),
scaled to the tiny model's context; compute each request's reference output
in the in-process engine; replay the workload on the disaggregated cluster
over gRPC, then over NCCL (gloo on CPU), then on the colocated baseline,
streaming two requests to the terminal; print TTFT/TBT percentiles and KV
transfer volume per setup (or JSON with ``--json``); tear everything down.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from cluster.config import ClusterConfig, load_config
from workers.sampling import SamplingParams

SETUPS = (("disaggregated-grpc", "tiny-disagg", "grpc"),
          ("disaggregated-nccl", "tiny-disagg", "nccl"),
          ("colocated", "tiny-colocated", "grpc"))


@dataclass(frozen=True)
class DemoRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    offset_s: float  # arrival time after the start of the replay


@dataclass
class RequestReport:
    id: str
    prompt_tokens: int
    output_token_ids: list[int]
    reference_token_ids: list[int]
    ttft_s: float
    tbt_s: list[float]  # gaps between consecutive tokens
    kv_bytes: int
    kv_transfer_s: float


@dataclass
class SetupReport:
    name: str
    transport: str
    ttft_p50_s: float
    ttft_p90_s: float
    tbt_p50_s: float
    tbt_p90_s: float
    kv_bytes: int
    kv_transfer_s_total: float
    matches_reference: int  # requests whose tokens equal the in-process engine's
    wall_s: float
    requests: list[RequestReport] = field(default_factory=list)


def demo_workload(n: int = 64, max_model_len: int = 2048, seed: int = 0,
                  span_s: float = 4.0) -> list[DemoRequest]:
    """``n`` requests from the Azure conversation trace, lengths scaled by 1/4
    (the trace's contexts run to ~8k tokens, the tiny model's to 2k) and the
    arrival times compressed into ``span_s`` seconds."""
    from sim.workload import load_trace

    rows = load_trace("azure-conv")
    rng = random.Random(seed)
    start = rng.randrange(0, max(1, len(rows) - n))
    picked = rows[start:start + n]
    t0, t1 = picked[0].offset_s, picked[-1].offset_s
    scale_t = span_s / max(t1 - t0, 1e-9)
    out = []
    for i, row in enumerate(picked):
        prompt = min(max(1, row.prompt_tokens // 4), max_model_len // 2)
        output = min(max(1, row.output_tokens // 4), max_model_len - prompt, 128)
        tokens = [rng.randrange(256) for _ in range(prompt)]
        out.append(DemoRequest(f"demo-{i}", tokens, output, (row.offset_s - t0) * scale_t))
    return out


def references(workload: list[DemoRequest]) -> dict[str, list[int]]:
    from workers.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig())
    done = engine.generate([r.prompt_token_ids for r in workload],
                           [_params(r) for r in workload])
    return {r.request_id: c.token_ids for r, c in zip(workload, done)}


def _params(r: DemoRequest) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)


async def replay(cluster_name: str, workload: list[DemoRequest], show: set[str], out) -> dict:
    from cluster.ray_client import ClusterClient

    client = ClusterClient(cluster_name)
    start = time.monotonic()

    async def one(r: DemoRequest):
        await asyncio.sleep(max(0.0, r.offset_s - (time.monotonic() - start)))
        tokens, times, last = [], [], None
        async for chunk in client.generate(r.prompt_token_ids, _params(r), r.request_id):
            tokens += chunk.token_ids
            times += chunk.token_times
            last = chunk
            if r.request_id in show and chunk.token_ids:
                print(f"  [{r.request_id}] +{chunk.token_ids}", file=out, flush=True)
        return r.request_id, tokens, times, last.timing

    results = await asyncio.gather(*(one(r) for r in workload))
    return {rid: (tokens, times, timing) for rid, tokens, times, timing in results}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 \
        else values[0]


def summarize(name: str, transport: str, workload, refs, results, wall_s: float) -> SetupReport:
    reports = []
    for r in workload:
        tokens, times, timing = results[r.request_id]
        reports.append(RequestReport(
            r.request_id, len(r.prompt_token_ids), tokens, refs[r.request_id],
            timing.get("ttft_s", 0.0), [b - a for a, b in zip(times, times[1:])],
            int(timing.get("kv_bytes", 0)), float(timing.get("kv_transfer_s", 0.0))))
    ttft = [x.ttft_s for x in reports]
    tbt = [g for x in reports for g in x.tbt_s]
    return SetupReport(
        name, transport, _pct(ttft, 50), _pct(ttft, 90), _pct(tbt, 50), _pct(tbt, 90),
        sum(x.kv_bytes for x in reports), sum(x.kv_transfer_s for x in reports),
        sum(x.output_token_ids == x.reference_token_ids for x in reports), wall_s, reports)


def run_setup(example: str, transport: str, redis_url: str, workload, refs, show, out,
              name: str) -> SetupReport:
    from cluster.launcher import Deployment

    cfg: ClusterConfig = load_config(example)
    cfg = replace(cfg, transport=transport, redis=replace(cfg.redis, url=redis_url,
                                                          namespace=f"demo-{name}"))
    dep = Deployment(cfg).start()
    try:
        t0 = time.perf_counter()
        results = asyncio.run(replay(cfg.name, workload, show, out))
        return summarize(name, transport, workload, refs, results, time.perf_counter() - t0)
    finally:
        dep.shutdown()


def run_demo(num_requests: int = 64, as_json: bool = False, out=sys.stdout) -> list[SetupReport]:
    import ray

    from cluster.redis_server import RedisServer

    say = (lambda *a: None) if as_json else (lambda *a: print(*a, file=out, flush=True))
    workload = demo_workload(num_requests)
    say(f"workload: {len(workload)} requests from the Azure conversation trace (lengths / 4)")
    say("computing reference outputs in the in-process engine ...")
    refs = references(workload)
    reports = []
    with RedisServer() as redis_server:
        ray.init(num_cpus=2, resources={"gpu_type:H100": 4, "gpu_type:L40S": 4},
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for name, example, transport in SETUPS:
                say(f"\n== {name}: config {example}, KV over {transport}; streaming two requests")
                show = set() if as_json else {"demo-0", "demo-1"}
                reports.append(run_setup(example, transport, redis_server.url, workload, refs,
                                         show, out, name))
        finally:
            ray.shutdown()
    if as_json:
        print(json.dumps({"setups": [_json(r) for r in reports],
                          "requests": [asdict(x) for x in reports[0].requests]}, indent=1),
              file=out)
    else:
        print_table(reports, out)
    return reports


def _json(r: SetupReport) -> dict:
    d = asdict(r)
    d["requests"] = [asdict(x) for x in r.requests]
    return d


def print_table(reports: list[SetupReport], out=sys.stdout) -> None:
    head = (f"{'setup':<20} {'TTFT p50':>9} {'TTFT p90':>9} {'TBT p50':>8} {'TBT p90':>8} "
            f"{'KV MiB':>7} {'KV xfer s':>9} {'= ref':>6}")
    print("\n" + head + "\n" + "-" * len(head), file=out)
    for r in reports:
        print(f"{r.name:<20} {r.ttft_p50_s * 1e3:>7.1f}ms {r.ttft_p90_s * 1e3:>7.1f}ms "
              f"{r.tbt_p50_s * 1e3:>6.1f}ms {r.tbt_p90_s * 1e3:>6.1f}ms "
              f"{r.kv_bytes / 2**20:>7.1f} {r.kv_transfer_s_total:>9.2f} "
              f"{r.matches_reference:>3}/{len(r.requests)}", file=out)
    print("\nTiny model with random weights: its text is meaningless by design; the point is\n"
          "that every setup reproduces the in-process engine's tokens exactly.", file=out)

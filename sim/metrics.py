"""Run metrics: latency percentiles, SLO attainment, goodput, cost, energy.

Lifecycle: after a run, ``summarize`` reads the trackers of every request and
the workers' busy time and returns a ``RunSummary``; ``RunSummary.to_json``
is what ``baton sim run --json`` prints.

Definitions (per request unless said otherwise):
- TTFT: arrival -> first token sampled. TPOT: (last - first token) /
  (output tokens - 1), undefined (excluded) for one-token outputs.
  TBT max: the longest gap between two consecutive tokens of the request.
  E2E: arrival -> last token.
- SLO attainment: share of *all* requests (rejected ones count as misses)
  whose TTFT and TPOT are both within the SLO; the run "meets" the SLO when
  the attainment reaches the target (DistServe, OSDI 2024).
- goodput_req_s: requests meeting the SLO per second of the run (first
  arrival -> last completion). throughput_tok_s: output tokens per second.
- GPU utilisation: busy fraction of each worker, and model FLOPs utilisation.
- cost: GPU-hours of the run x price; cost_per_mtok_usd per million output
  tokens. Energy: each GPU draws idle power plus (peak - idle) x its busy
  fraction (a linear utilisation model, as in Splitwise's provisioning study).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from sim.tracker import Tracker


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 2000.0  # time to first token bound
    tpot_ms: float = 100.0  # time per output token bound
    attainment: float = 0.9  # share of requests that must meet both

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError(f"SLO bounds must be > 0, got ttft_ms={self.ttft_ms}, tpot_ms={self.tpot_ms}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"SLO attainment {self.attainment} must be in (0, 1]")


@dataclass(frozen=True)
class Percentiles:
    mean: float
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class WorkerUsage:
    """One worker's share of the run, for cost, energy and utilisation."""

    worker_id: str
    gpu_type: str
    gpus: int  # tensor-parallel degree
    busy_s: float  # time stepping
    flops: float  # useful FLOPs on one shard
    peak_flops: float  # one GPU's peak at the run's dtype
    price_per_hour: float  # per GPU
    idle_power_w: float  # per GPU
    peak_power_w: float  # per GPU


@dataclass
class RunSummary:
    num_requests: int  # in the workload
    completed: int  # finished
    rejected: int  # refused by admission (overloaded / too long)
    duration_s: float  # first arrival -> last completion
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    e2e_ms: Percentiles
    tbt_max_ms: Percentiles
    throughput_tok_s: float  # output tokens / s
    total_throughput_tok_s: float  # (prompt + output) tokens / s
    request_throughput_req_s: float
    slo: SLO
    slo_attainment: float  # share of all requests meeting TTFT and TPOT
    ttft_attainment: float
    tpot_attainment: float
    meets_slo: bool  # slo_attainment >= slo.attainment
    goodput_req_s: float  # requests meeting the SLO per second
    gpu_utilization: float  # busy fraction, GPU-weighted
    mfu: float  # model FLOPs utilisation, GPU-weighted
    num_gpus: int
    cost_usd: float  # GPU-hours x price over the run
    cost_per_mtok_usd: float  # per million output tokens
    cost_per_mtok_total_usd: float  # per million prompt + output tokens
    energy_j: float
    energy_per_token_j: float  # per output token
    preemptions: int
    extra: dict = field(default_factory=dict)  # run facts (config, sim speed), not metrics

    def to_json(self) -> dict:
        return _rounded(asdict(self))


def percentiles(values: list[float]) -> Percentiles:
    if not values:
        return Percentiles(math.nan, math.nan, math.nan, math.nan)
    v = sorted(values)
    return Percentiles(sum(v) / len(v), _pct(v, 50), _pct(v, 90), _pct(v, 99))


def _pct(v: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def tpot_s(tr: Tracker) -> float | None:
    n = tr.req.output_tokens
    if tr.finish_s is None or n < 2:
        return None
    return (tr.finish_s - tr.first_token_s) / (n - 1)


def meets(tr: Tracker, slo: SLO) -> bool:
    if tr.finish_s is None:
        return False
    tpot = tpot_s(tr)
    return (tr.first_token_s - tr.req.arrival_s) * 1e3 <= slo.ttft_ms and \
        (tpot is None or tpot * 1e3 <= slo.tpot_ms)


def summarize(trackers: list[Tracker], usage: list[WorkerUsage], slo: SLO) -> RunSummary:
    # list comprehensions rather than generators throughout: a million-request run
    # reads a million trackers a dozen times here
    done = [t for t in trackers if t.finish_s is not None]
    if not done:
        raise ValueError("no request completed: nothing to summarize")
    reqs = [t.req for t in done]
    start = min([t.req.arrival_s for t in trackers])
    duration = max([t.finish_s for t in done]) - start
    ttft = [(t.first_token_s - r.arrival_s) * 1e3 for t, r in zip(done, reqs)]
    # tpot_s of each (None: one output token)
    tpot = [(t.finish_s - t.first_token_s) / (r.output_tokens - 1) if r.output_tokens >= 2
            else None for t, r in zip(done, reqs)]
    tpots = [x * 1e3 for x in tpot if x is not None]
    out_tokens = sum([r.output_tokens for r in reqs])
    all_tokens = out_tokens + sum([r.prompt_tokens for r in reqs])
    # ``meets`` for each, from the values above
    ok = len([1 for x, y in zip(ttft, tpot)
              if x <= slo.ttft_ms and (y is None or y * 1e3 <= slo.tpot_ms)])
    n = len(trackers)
    ttft_ok = len([1 for x in ttft if x <= slo.ttft_ms])
    tpot_ok = len([1 for y in tpot if (y or 0.0) * 1e3 <= slo.tpot_ms])
    gpus = sum(u.gpus for u in usage)
    cost = sum(u.gpus * u.price_per_hour for u in usage) * duration / 3600
    energy = sum(u.gpus * (u.idle_power_w * duration + (u.peak_power_w - u.idle_power_w) * u.busy_s)
                 for u in usage)
    return RunSummary(
        num_requests=n, completed=len(done), rejected=len([1 for t in trackers if t.rejected]),
        duration_s=duration, ttft_ms=percentiles(ttft), tpot_ms=percentiles(tpots),
        e2e_ms=percentiles([(t.finish_s - r.arrival_s) * 1e3 for t, r in zip(done, reqs)]),
        tbt_max_ms=percentiles([t.max_gap_s * 1e3 for t, r in zip(done, reqs)
                                if r.output_tokens > 1]),
        throughput_tok_s=out_tokens / duration, total_throughput_tok_s=all_tokens / duration,
        request_throughput_req_s=len(done) / duration, slo=slo,
        slo_attainment=ok / n, ttft_attainment=ttft_ok / n, tpot_attainment=tpot_ok / n,
        meets_slo=ok / n >= slo.attainment, goodput_req_s=ok / duration,
        gpu_utilization=sum(u.gpus * u.busy_s for u in usage) / (gpus * duration),
        mfu=sum(u.gpus * u.flops / u.peak_flops for u in usage) / (gpus * duration),
        num_gpus=gpus, cost_usd=cost,
        cost_per_mtok_usd=cost / out_tokens * 1e6,
        cost_per_mtok_total_usd=cost / all_tokens * 1e6,
        energy_j=energy, energy_per_token_j=energy / out_tokens,
        preemptions=sum([t.preemptions for t in trackers]),
    )


def _rounded(obj):
    """Floats to 6 significant digits: stable, readable JSON."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj

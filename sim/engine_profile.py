"""Calibrating the ``cpu`` profile on this machine's in-process engine, and
the comparison of simulated with real request timings.

Lifecycle of ``baton sim calibrate`` (target cpu):
1. ``profile_engine``: build ``workers.engine.LLMEngine`` (model ``tiny`` by
   default), run scenarios of prompt and decode batches, and time every
   ``engine.step()``; the step's shape is read from the very plan the
   engine's planner returned (wrapped, not re-computed);
2. split the scenarios (seeded), fit ``EfficiencyProfile("cpu")`` on the
   first part with ``sim.calibration.fit_profile``, report the held-out error
   of prefill steps and of decode steps.

The engine runs with one torch thread, as the cluster's CPU workers do
(``workers.worker_config.WorkerSpec.torch_threads``). ``baton sim calibrate
--target cluster`` (sim.cluster_probe) measures the running cluster instead.

Comparison (``benchmarks/sim_vs_cluster.py``): real and simulated runs of a
workload become ``RequestTiming`` lists; ``compare`` reports the p50 and p90
of TTFT and TPOT of both and their relative error.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np

from sim.calibration import CPU_PARAMS, StepSample, ape, fit_profile, predict
from sim.latency import EfficiencyProfile
from sim.workload import Request

ENGINE_LIMITS = {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "prefill_chunk_size": 512,
                 "block_size": 16, "kv_cache_bytes": 64 << 20}


def _engine(model: str, limits: dict):
    from workers.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model=model, enable_prefix_caching=False, num_threads=1,
                                  **limits))


def _step_shape(plan) -> tuple:
    """The simulator's view of one planned step (as ``sim.workers`` computes it)."""
    tokens = dec_ctx = rows = 0
    prefill = []
    for c in plan.chunks:
        seq, n = c.seq, c.num_tokens
        tokens += n
        end = seq.num_computed_tokens + n
        rows += end == seq.num_tokens
        if seq.is_decoding:
            dec_ctx += end
        else:
            prefill.append((n, seq.num_computed_tokens))
    return tokens, len(plan.chunks), rows, dec_ctx, tuple(prefill)


class StepTimer:
    """Wraps an engine's planner to record each step's shape and wall time."""

    def __init__(self, engine):
        self.engine, self.samples = engine, []
        self._plan = engine.planner.plan
        self._shape = None
        engine.planner.plan = self._wrapped

    def _wrapped(self, waiting, running):
        plan = self._plan(waiting, running)
        self._shape = _step_shape(plan) if plan.chunks else None
        return plan

    def step(self, key: str = ""):
        t0 = time.perf_counter()
        outs = self.engine.step()
        dt = time.perf_counter() - t0
        if self._shape is not None:
            tokens, seqs, rows, dec, pre = self._shape
            kind = "prompt" if pre else "token"
            self.samples.append(StepSample(tokens, seqs, rows, dec, pre, dt, kind, 1, key))
        return outs


def scenarios(quick: bool) -> list[tuple[int, int, int]]:
    """(batch, prompt tokens, output tokens) per scenario."""
    batches = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32)
    prompts = (16, 128, 512) if quick else (16, 64, 256, 512, 1024)
    return [(b, p, 16) for b in batches for p in prompts if b * p <= 8192]


def profile_engine(model: str = "tiny", quick: bool = False, seed: int = 0,
                   limits: dict | None = None, reps: int = 3) -> list[StepSample]:
    """Each scenario runs ``reps`` times after one warm-up run; a step's time is
    the median over the repetitions (the machine is shared: medians, not means)."""
    from workers.sampling import SamplingParams
    rng = random.Random(seed)
    engine = _engine(model, limits or ENGINE_LIMITS)
    timer = StepTimer(engine)
    samples = []
    for i, (b, p, out) in enumerate(scenarios(quick)):
        params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
        prompts = [[rng.randrange(256) for _ in range(p)] for _ in range(b)]
        runs = []
        for rep in range(reps + 1):
            timer.samples = []
            for j, prompt in enumerate(prompts):
                engine.add_request(f"cal-{i}-{rep}-{j}", prompt, params)
            while engine.has_unfinished():
                timer.step(f"b{b}/p{p}")
            runs.append(timer.samples)
        samples += [replace(steps[0], seconds=statistics.median(s.seconds for s in steps))
                    for steps in zip(*runs[1:], strict=False)]
    return samples


def calibrate_cpu(model: str = "tiny", quick: bool = False, seed: int = 0, holdout: float = 0.3
                  ) -> tuple[EfficiencyProfile, dict]:
    samples = profile_engine(model, quick, seed)
    keys = sorted({s.key for s in samples})
    random.Random(seed).shuffle(keys)
    test_keys = set(keys[:max(1, round(len(keys) * holdout))])
    train = [s for s in samples if s.key not in test_keys]
    test = [s for s in samples if s.key in test_keys]
    prof = fit_profile(train, model, "cpu", "fp32", CPU_PARAMS,
                       fitted_on=f"LLMEngine({model}) on this machine, {len(train)} steps "
                                 f"of {len(keys) - len(test_keys)} scenarios")
    report = {"steps": len(samples), "scenarios": len(keys), "held_out_scenarios": len(test_keys)}
    for kind in ("prompt", "token"):
        chosen = [s for s in test if s.kind == kind]
        if chosen:
            e = ape(predict(chosen, model, "cpu", "fp32", prof), np.array([s.seconds for s in chosen]))
            report[f"{kind}_step_mdape_test"] = round(float(np.median(e)), 2)
    return prof, report


# ----- real against simulated --------------------------------------------------------------------
@dataclass(frozen=True)
class RequestTiming:
    """One request's latencies, measured (real) or simulated."""

    request_id: str
    ttft_s: float  # arrival -> first token
    tpot_s: float | None  # mean gap between later tokens (None for one-token outputs)


def _timing(r: Request, first_s: float, last_s: float) -> RequestTiming:
    tpot = (last_s - first_s) / (r.output_tokens - 1) if r.output_tokens > 1 else None
    return RequestTiming(r.request_id, first_s - r.arrival_s, tpot)


def sim_timings(result) -> list[RequestTiming]:
    return [_timing(t.req, t.first_token_s, t.finish_s) for t in result.trackers]


def compare(real: list[RequestTiming], simulated: list[RequestTiming]) -> dict:
    """p50/p90 of TTFT and TPOT, real vs simulated, and their relative error."""
    out = {}
    for name, get in (("ttft", lambda t: t.ttft_s), ("tpot", lambda t: t.tpot_s)):
        a = [get(t) for t in real if get(t) is not None]
        b = [get(t) for t in simulated if get(t) is not None]
        for q in (50, 90):
            ra, sb = float(np.percentile(a, q)), float(np.percentile(b, q))
            out[f"{name}_p{q}_ms"] = {"real": round(ra * 1e3, 2), "sim": round(sb * 1e3, 2),
                                      "error_pct": round((sb - ra) / ra * 100, 1)}
    return out

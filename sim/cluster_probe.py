"""Driving the real Baton cluster on this machine: what ``baton sim calibrate
--target cluster`` measures and what ``benchmarks/sim_vs_cluster.py``
compares the simulator with.

Lifecycle::

    LocalCluster(config).start()   a throw-away redis-server, a local Ray
                                   cluster offering the config's emulated GPU
                                   types (2 CPUs), and the Deployment
                                   (workers, then the controller)
    run(requests)                  each request submitted through the
                                   ``ClusterClient`` at its arrival time; every
                                   token stamped when it reaches the controller
    stop()                         deployment, Ray and redis-server shut down

Ray, the workers and torch are imported only inside these calls: importing
this module (and the simulator) does not.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field, replace

from sim.workload import Request

MIB = 1 << 20
# (requests decoding together, prompt tokens) of the decode probes that go with a
# load sample: a light load decodes one or two requests at a time, too few to tell
# a step's fixed cost from its per-sequence and per-context cost
DECODE_SHAPES = ((4, 256), (8, 256), (8, 1024), (16, 512))


@dataclass(frozen=True)
class ClusterRun:
    """One request as the real controller saw it (wall-clock seconds)."""

    request: Request
    request_id: str  # the cluster's id of it (unique per run)
    arrival_s: float  # time.time() at the controller's submit
    token_times: tuple[float, ...]  # when each token reached the controller
    timing: dict = field(default_factory=dict)  # the controller's breakdown (queue_s, ...)

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def cluster_timings(runs: list[ClusterRun]):
    """The runs as ``sim.engine_profile.RequestTiming`` (what ``compare`` reads)."""
    from sim.engine_profile import RequestTiming
    return [RequestTiming(r.request.request_id, r.ttft_s, r.tpot_s) for r in runs]


def cluster_config(name: str, redis_url: str, pools: dict[str, dict] | None = None,
                   example: str = "tiny-disagg"):
    """The example config with per-pool overrides, a unique name and this redis."""
    from cluster.config import load_config
    cfg = load_config(example)
    over = pools or {}
    cfg = replace(cfg, pools=tuple(replace(p, **over.get(p.name, {})) for p in cfg.pools))
    return replace(cfg, name=name, redis=replace(cfg.redis, url=redis_url, namespace=name))


class LocalCluster:
    def __init__(self, pools: dict[str, dict] | None = None, example: str = "tiny-disagg"):
        self.pools, self.example = pools, example
        self.config = None
        self._redis = self._deployment = None
        self._owns_ray = False
        self._rng = random.Random(0)  # prompt tokens: never the same prompt twice (prefix cache)

    def start(self) -> LocalCluster:
        import ray

        from cluster.launcher import Deployment
        from cluster.redis_server import RedisServer

        self._redis = RedisServer().start()
        self.config = cluster_config(f"simcmp-{os.getpid()}-{random.randrange(1 << 30)}",
                                     self._redis.url, self.pools, self.example)
        types = {p.gpu_type for p in self.config.pools}
        if not ray.is_initialized():  # else a test session's Ray cluster is reused
            self._owns_ray = True
            ray.init(address="local", num_cpus=2, resources={f"gpu_type:{t}": 4 for t in types},
                     object_store_memory=256 * MIB, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self._deployment = Deployment(self.config).start()
        return self

    def stop(self) -> None:
        import ray
        if self._deployment is not None:
            self._deployment.shutdown()
        if self._owns_ray:
            ray.shutdown()
        if self._redis is not None:
            self._redis.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, requests: list[Request]) -> list[ClusterRun]:
        """Submit every request at its arrival time (seconds after the first);
        fresh random prompt tokens, greedy, EOS ignored, exactly ``output_tokens``."""
        prompts = {r.request_id: [self._rng.randrange(256) for _ in range(r.prompt_tokens)]
                   for r in requests}
        return asyncio.run(self._run_all(requests, prompts))

    def probe(self, requests: list[Request], alone: bool = True) -> list[Probe]:
        """Runs with the workers' per-layer KV times: each request alone (sent
        when the previous one finished), or all at their arrival times."""
        runs = ([self.run([replace(r, arrival_s=0.0)])[0] for r in requests] if alone
                else self.run(requests))
        return [self._timelines(run) for run in runs]

    def _timelines(self, run: ClusterRun) -> Probe:
        import ray
        times = {role: [t for _, (rl, _, h) in self._deployment.workers.items() if rl == role
                        for t in [ray.get(getattr(h, method).remote(run.request_id))] if t]
                 for role, method in (("prefill", "layer_timeline"), ("decode", "receive_timeline"))}
        return Probe(run, tuple(times["prefill"][0]), tuple(times["decode"][0]))

    async def _run_all(self, requests: list[Request], prompts: dict) -> list[ClusterRun]:
        from cluster.ray_client import ClusterClient
        client = ClusterClient(self.config.name)
        await client.controller()
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(self._one(client, r, prompts[r.request_id], t0)
                                           for r in requests)))

    async def _one(self, client, r: Request, prompt: list[int], t0: float) -> ClusterRun:
        from workers.sampling import SamplingParams
        await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
        params = SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True)
        times: list[float] = []
        timing: dict = {}
        rid = f"{r.request_id}-{os.getpid()}-{random.randrange(1 << 30)}"
        async for chunk in client.generate(prompt, params, request_id=rid):
            times += chunk.token_times
            timing = chunk.timing
        if len(times) != r.output_tokens:
            raise RuntimeError(f"{r.request_id}: {len(times)} tokens, want {r.output_tokens} "
                               f"({timing})")
        return ClusterRun(r, rid, timing["arrival_s"], tuple(times), timing)


# ----- calibration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """A calibration request and what the workers recorded about it."""

    run: ClusterRun
    layers_done_s: tuple[float, ...]  # prefill worker: each layer computed and handed over
    layers_landed_s: tuple[float, ...]  # decode worker: each layer verified


def calibrate_cluster(cluster: LocalCluster, quick: bool = False,
                      workload: list[Request] | None = None, decode_probes: bool = False):
    """Measure, on the running cluster, what the simulator models of it:

    - engine steps: with ``workload`` (a sample of the load to be simulated),
      each of its prompts' prefill (``prefill_s``) and each request's time per
      token at the mean number of requests decoding beside it: the steps
      under that load, CPU contention between the workers included (they
      share this machine's cores; GPUs would not). With ``decode_probes``,
      also ``decode_samples``: batches of up to 16 requests at contexts up to
      ~1,100 tokens, for loads that decode many requests at once (a light
      load's samples cannot separate a step's fixed cost from its per-sequence
      and per-context cost). Without ``workload``: prompts of several lengths
      one at a time and batches of b requests decoding together.
      The ``cpu`` efficiency profile is fitted on them (sim.calibration);
    - the KV link: from each prompt's last layer handed over (prefill worker)
      to its last layer verified (decode worker), against its bytes;
    - the control plane (sim.control): KV verified -> first token at the
      controller (``result_s``); first -> second token beyond one decode step
      (``admit_s``); the rest of time-to-first-token (``dispatch_s``);
    - each prefill step's measured / modelled time (``prefill_step_noise``).

    Returns (EfficiencyProfile, SimSpec options, report)."""
    from sim.calibration import StepSample

    cluster.run([Request(0, 0.0, 64, 8)])  # warm-up: first calls pay for imports and caches
    if workload:
        probes = cluster.probe(workload, alone=False)
        samples = _workload_samples([p.run for p in probes], StepSample)
        what = f"a {len(workload)}-request load"
        if decode_probes:
            samples, what = samples + decode_samples(cluster), what + " and decode batches"
        return fit_cluster(probes, samples, cluster.config, what)
    probes, samples = _shape_probes(cluster, quick, StepSample)
    return fit_cluster(probes, samples, cluster.config, "probes one shape at a time")


def fit_cluster(probes: list[Probe], samples: list, config, what: str):
    """The ``cpu`` profile fitted on step ``samples``; link and control plane
    from ``probes``. Returns (EfficiencyProfile, SimSpec options, report)."""
    from sim.calibration import CPU_PARAMS, ape, fit_profile, predict
    from sim.latency import sim_dtype

    model, dtype = config.model.source, sim_dtype(config.model.dtype)
    # robust: on a shared machine some steps are slowed many times by other processes
    profile = fit_profile(samples, model, "cpu", dtype, CPU_PARAMS, loss="soft_l1",
                          fitted_on=f"the local Baton cluster ({model}): {len(samples)} step "
                                    f"samples of {what}")
    options, report = _fit_control(probes, model)
    for kind in ("prompt", "token"):
        chosen = [s for s in samples if s.kind == kind]
        predicted = predict(chosen, model, "cpu", dtype, profile)
        err = ape(predicted, [s.seconds for s in chosen])
        report[f"{kind}_step_mdape_fit"] = round(float(sorted(err)[len(err) // 2]), 2)
        if kind == "prompt":
            options["prefill_step_noise"] = tuple(sorted(
                round(s.seconds / float(t), 4) for s, t in zip(chosen, predicted, strict=True)))
    report["samples"] = len(samples)
    return profile, options, report


def _shape_probes(cluster: LocalCluster, quick: bool, StepSample) -> tuple[list[Probe], list]:
    prompts = (32, 256, 512) if quick else (32, 128, 256, 384, 512)
    batches = (1, 4, 8) if quick else (1, 2, 4, 8, 16)
    reps = 2 if quick else 3
    probes = [p for n in prompts for p in cluster.probe([Request(0, 0.0, n, 16)] * reps)]
    samples = [StepSample(p.run.request.prompt_tokens, 1, 1, 0,
                          ((p.run.request.prompt_tokens, 0),), p.run.timing["prefill_s"],
                          "prompt", 1, f"p{p.run.request.prompt_tokens}") for p in probes]
    for b in batches:
        for _ in range(reps):
            step, ctx = _batch_step(cluster.run([Request(i, 0.0, 32, 64) for i in range(b)]))
            samples.append(StepSample(b, b, b, ctx, (), step, "token", 1, f"b{b}"))
    return probes, samples


def decode_samples(cluster: LocalCluster, shapes=DECODE_SHAPES, reps: int = 2,
                   output_tokens: int = 128) -> list:
    """Token steps of ``b`` requests decoding together after ``p``-token
    prompts, per (b, p) of ``shapes``: the time per token while all of them
    decode (sim.calibration.StepSample, kind "token")."""
    from sim.calibration import StepSample
    out = []
    for b, p in shapes:
        for _ in range(reps):
            runs = cluster.run([Request(i, 0.0, p, output_tokens) for i in range(b)])
            step, ctx = _batch_step(runs)
            out.append(StepSample(b, b, b, ctx, (), step, "token", 1, f"b{b}p{p}"))
    return out


def load_samples(runs: list[ClusterRun]) -> list:
    """Step samples (sim.calibration.StepSample) of runs under a load."""
    from sim.calibration import StepSample
    return _workload_samples(runs, StepSample)


def _workload_samples(runs: list[ClusterRun], StepSample) -> list:
    """A prefill step per prompt; per request, its time per token at the mean
    number of requests decoding beside it (from the overlap of their tokens)."""
    spans = [(r.token_times[1], r.token_times[-1], r) for r in runs if len(r.token_times) > 2]
    out = [StepSample(r.request.prompt_tokens, 1, 1, 0, ((r.request.prompt_tokens, 0),),
                      r.timing["prefill_s"], "prompt", 1, f"w{r.request_id}") for r in runs]
    for a, b, r in spans:
        if b <= a:
            continue
        beside = [((min(b, b2) - max(a, a2)) / (b - a), r2) for a2, b2, r2 in spans
                  if r2 is not r and min(b, b2) > max(a, a2)]
        batch = 1 + sum(w for w, _ in beside)
        kv = (r.request.prompt_tokens + r.request.output_tokens // 2) + sum(
            w * (r2.request.prompt_tokens + r2.request.output_tokens // 2) for w, r2 in beside)
        out.append(StepSample(round(batch), round(batch), round(batch), round(kv), (),
                              _decode_step(r), "token", 1, f"w{r.request_id}"))
    return out


def _batch_step(runs: list[ClusterRun]) -> tuple[float, int]:
    """(time per token while every request decodes, total KV length mid-way).
    Tokens reach the controller in batches when it polls late: time over a
    span of tokens, never single gaps."""
    start = max(r.token_times[1] for r in runs)  # all admitted
    end = min(r.token_times[-1] for r in runs)  # none finished
    per_token = []
    for r in runs:
        inside = [t for t in r.token_times if start <= t <= end]
        if len(inside) > 2 and inside[-1] > inside[0]:
            per_token.append((inside[-1] - inside[0]) / (len(inside) - 1))
    if not per_token:  # the batch never decoded whole: each request's own decode
        per_token = [_decode_step(r) for r in runs]
    tokens = sum(r.request.prompt_tokens + r.request.output_tokens // 2 for r in runs)
    return sorted(per_token)[len(per_token) // 2], tokens


def _decode_step(r: ClusterRun) -> float:
    """Time per token from the second to the last (the first comes from prefill)."""
    return (r.token_times[-1] - r.token_times[1]) / (len(r.token_times) - 2)


def _fit_control(probes: list[Probe], model: str) -> tuple[dict, dict]:
    import numpy as np

    from sim.control import ControlPlane
    from sim.models import get_model

    layers = get_model(model).num_layers
    med = lambda xs: float(np.median(xs))  # noqa: E731
    result = [p.run.token_times[0] - p.layers_landed_s[-1] for p in probes]
    exposed = [max(0.0, p.layers_landed_s[-1] - p.layers_done_s[-1]) for p in probes]
    kv_bytes = np.array([p.run.timing["kv_bytes"] for p in probes], dtype=float)
    # exposed = latency + last layer's bytes / bandwidth (the layers before it overlap
    # the step); Theil-Sen (median slope and intercept): some transfers stall for
    # tens of ms when another process holds the core
    x, y = kv_bytes / layers, np.array(exposed)
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x))
              if x[j] != x[i]]
    slope = max(med(slopes), 0.0) if slopes else 0.0
    latency = max(med(y - slope * x), 0.0)
    bandwidth = 1.0 / slope if slope > 1e-12 else 1e12
    gaps = [p.run.token_times[1] - p.run.token_times[0] - _decode_step(p.run) for p in probes]
    # queueing at the controller and the prefill worker is simulated; their idle
    # floor (polling, wake-ups) is control-plane delay
    waits = [p.run.timing["queue_s"] + p.run.timing["prefill_queue_s"] for p in probes]
    rest = [p.run.ttft_s - p.run.timing["prefill_s"] - r - e - (w - min(waits))
            for p, r, e, w in zip(probes, result, exposed, waits, strict=True)]
    control = ControlPlane(dispatch_s=max(0.0, med(rest)), result_s=max(0.0, med(result)),
                           admit_s=max(0.0, med(gaps)), first_token_waits_for_kv=True)
    report = {"probes": len(probes), "ttft_p50_ms": round(med([p.run.ttft_s for p in probes]) * 1e3, 2),
              "exposed_transfer_p50_ms": round(med(exposed) * 1e3, 3),
              "link_gbps": round(bandwidth * 8 / 1e9, 3), "link_latency_ms": round(latency * 1e3, 3),
              "dispatch_ms": round(control.dispatch_s * 1e3, 3),
              "result_ms": round(control.result_s * 1e3, 3),
              "admit_ms": round(control.admit_s * 1e3, 3)}
    return {"control": control, "link_bandwidth": bandwidth, "link_latency_s": latency}, report

"""Control-plane overhead: (a) how many requests per second the controller
admits, schedules, routes and finishes when workers answer at once; (b) how
much latency per streamed token the cluster adds over the in-process engine.

(a) Throughput. The real ``cluster.controller.Controller`` runs as a Ray
async actor, created exactly as ``Deployment.start_controller`` does
(``num_cpus=0, max_concurrency=1000``), against the real Redis
(``cluster.redis_server.RedisServer``) and STUB worker actors (defined here,
benchmark-only, placed by GPU type like real workers) that implement the
same batched methods as the real workers and answer at once:

- decode stub: ``reserve_batch`` -> block ids, ``release_batch`` /
  ``admit_batch`` / ``submit_batch`` / ``abort``, ``load``, ``kv_endpoint``,
  ``model_info``; ``stream_outputs`` behaves like an idle real decode worker:
  no events, an empty batch every ``idle_s``;
- prefill stub: ``submit_prefills`` -> every job's ``PrefillResult``
  (``finish_reason "length"``: the requests ask for ``max_tokens=1``, so no
  decode follows) is ready at once and streamed by ``stream_results`` (or
  returned by the ``next_results`` long-poll).

Config: ``tiny-disagg`` (1 prefill + 1 decode worker, fcfs, least-loaded;
prefill budget 2048 tokens, decode ``max_num_seqs`` 64 — the controller's own
flow control applies) with ``admission.max_waiting`` raised to the request
count so nothing is refused. The driver submits ``--requests`` requests
(``--prompt-len``-token prompts) with ``Controller.submit_many`` calls of
``--submit-batch`` requests, at most ``--window`` requests in unanswered calls
and (closed loop) at most ``--in-flight`` requests submitted but not finished
(``0``: open loop), and watches Redis's completed-request log. Each request
costs the controller: its share of a submit_many call and of a journal
command, a scheduling round, its share of one ``reserve_batch``, one
``submit_prefills`` and one ``stream_results`` item per round (releases
ride on the next round's ``reserve_batch``), the token and finish journal writes. Reported: submitted/s (all
submits returned) and finished/s = requests / (first submit -> last request
finished), plus CPU seconds per 1,000 requests of the controller, the stubs,
Redis and the driver. Target: >= 2,000 requests/s.

Peers measured in the same run (``--floor-requests`` each), with the same
stubs, driver and limits: ``FloorController``, an async actor doing only
what any controller of this design must do per request, batched the same
way — ``submit_many`` in; per submit batch one ``reserve_batch``, one
``submit_prefills``, the results through ``stream_results`` (releases ride
on the next ``reserve_batch``, as in the controller) and, in the first floor, the same journal writes
through the same ``JournalBatcher`` — with no queue, scheduler, router,
flow control or bookkeeping. Their gap to the controller is the
controller's own logic. A calibration of one no-op Ray actor call (calls/s,
CPU per call) closes (a).

(b) Streaming latency. The tiny model, one request (``--itl-prompt-len``
random byte tokens, ``--itl-tokens`` tokens, greedy, EOS ignored):
- in-process: ``LLMEngine.step()`` loop (1 torch thread, like a worker); a
  token's time = when the ``step()`` that produced it returned;
- cluster: ``tiny-disagg`` (KV over gRPC) via ``Deployment``, streamed three
  ways: ``cluster.ray_client.ClusterClient.generate`` (tokens through the
  request's Redis output channel, merged with one lazy
  ``Controller.stream_chunks`` call for catch-up, finish and safety net),
  one plain ``Controller.stream_chunks`` streaming call (a Ray item per
  chunk), and the path users stream through: the cluster's own gRPC
  frontend (``Controller.start_frontends``, served by the controller
  process) with ``cluster.client.BatonClient.stream`` in the driver, token
  ids in; a token's time = when the chunk carrying it reached the client
  (tokens of one chunk share a time). In every path the decode worker's
  events reach the controller through its Redis event channel
  (``cluster.token_channel``).
ITL = gaps between consecutive tokens of the request (the first gap is
token 1 -> token 2). Runs alternate (in-process, then each cluster path)
``--itl-reps`` times after one warm-up each; gaps are pooled. Reported: p50
and mean ITL of each, the p50 difference (target <= 1 ms), the cluster's
chunking, the control plane's CPU per token and the decode engine thread's
wait for a CPU.

Usage::

    python benchmarks/control_plane_bench.py                 # (a) 20000 requests, then (b)
    python benchmarks/control_plane_bench.py --only throughput --requests 2000
    python benchmarks/control_plane_bench.py --profile 8 --json out.json
    python benchmarks/control_plane_bench.py --only itl --threads --itl-profile 8

``--threads`` adds each process's CPU per token by thread name;
``--itl-profile S`` py-spies the decode worker, the controller and the driver
while each cluster path streams for S seconds (``--py-spy`` names the binary).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench_common import emit_report

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20
TARGET_RPS = 2000.0
TARGET_ITL_ADDED_MS = 1.0


# ----- stub workers (benchmark-only) ------------------------------------------------
class _StubWorker:
    """What every stub worker answers at once: identity, load, model limits."""

    role = ""

    def __init__(self, worker_id: str, gpu_type: str, max_num_seqs: int, block_size: int):
        from workers.messages import WorkerLoad

        self.worker_id, self.block_size = worker_id, block_size
        self._load = WorkerLoad(worker_id, self.role, gpu_type, 0, 0, 1 << 20, 1 << 20,
                                block_size, 2048, max_num_seqs, f"stub:{gpu_type}")

    async def pid(self) -> int:
        return os.getpid()

    async def ping(self) -> str:
        return self.worker_id

    async def load(self):
        return self._load

    async def model_info(self) -> dict:
        return {"max_model_len": 4096, "vocab_size": 32000, "eos_token_ids": [257]}


class StubDecode(_StubWorker):
    """The decode worker's batched methods (as ``workers.decode_worker``)."""

    role = "decode"

    async def kv_endpoint(self) -> str:
        return "127.0.0.1:1"

    async def reserve_batch(self, items, release: list[str] = ()) -> list[list[int]]:
        return [list(range(-(-len(it.token_ids) // self.block_size))) for it in items]

    async def release_batch(self, request_ids: list[str]) -> list[bool]:
        return [True] * len(request_ids)

    async def admit_batch(self, items, timeout_s: float = 60.0) -> list[str]:
        return ["admitted"] * len(items)

    async def submit_batch(self, items) -> list[str]:
        return [""] * len(items)

    async def abort(self, request_id: str) -> bool:
        return True

    async def next_outputs(self, cursor: int, timeout_s: float = 1.0):
        await asyncio.sleep(timeout_s)  # an idle decode worker: no events
        return [], cursor, self._load

    async def stream_outputs(self, cursor: int, idle_s: float = 1.0):
        while True:  # an idle decode worker: an empty batch every idle_s
            await asyncio.sleep(idle_s)
            yield [], cursor, self._load, time.time()


class StubPrefill(_StubWorker):
    """The prefill worker's batched methods (as ``workers.prefill_worker``):
    every job's result is ready at once and waits for ``next_results``."""

    role = "prefill"

    def __init__(self, *args):
        from workers.mailbox import Mailbox

        super().__init__(*args)
        self._results = Mailbox()

    async def submit_prefills(self, jobs) -> list[str]:
        from workers.messages import PrefillResult

        self._results.put([PrefillResult(j.request_id, 1, "a", "length", True, 1, 0, 0.0, 0.0,
                                         0.0, generation=j.generation) for j in jobs])
        return [""] * len(jobs)

    async def next_results(self, cursor: int, timeout_s: float = 1.0):
        results, end = await self._results.since(cursor, timeout_s)
        return results, end, self._load

    async def stream_results(self, cursor: int, idle_s: float = 1.0):
        async for results, end in self._results.follow(cursor, idle_s):
            yield results, end, self._load

    async def abort(self, request_id: str) -> bool:
        return True


class FloorController:
    """Peer (benchmark-only): the least a controller must do per request, with
    the same batching — ``submit_many`` in; per batch one ``reserve_batch``
    (carrying the releases of the requests finished since the last one), one
    ``submit_prefills``, the results through ``stream_results``; with ``with_redis``, the same journal
    writes through the same ``JournalBatcher`` — and no queue, scheduler,
    router or bookkeeping."""

    def __init__(self, workers: dict, redis_url: str, namespace: str, with_redis: bool):
        from cluster.state import JournalBatcher, StateStore

        self.p = next(h for role, _, h in workers.values() if role == "prefill")
        self.d = next(h for role, _, h in workers.values() if role != "prefill")
        self.journal = JournalBatcher(StateStore(redis_url, namespace)) if with_redis else None
        self.done = 0
        self._prompts: dict[str, int] = {}
        self._releases: list[str] = []  # sent with the next reserve_batch, as the controller
        self._tasks: set = set()

    async def pid(self) -> int:
        return os.getpid()

    async def submit_many(self, items) -> list:
        from cluster.controller import SubmitOutcome

        if self.journal is not None:
            await asyncio.gather(*(self.journal.new(it.request_id, it.prompt_token_ids,
                                                    it.params, time.time()) for it in items))
        if not self._tasks:
            self._spawn(self._poll())
        self._spawn(self._run(items))
        return [SubmitOutcome(it.request_id) for it in items]

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items) -> None:
        from workers.messages import PrefillJob, ReserveItem

        if self.journal is not None:
            for it in items:
                self.journal.route(it.request_id, "prefill", "decode")
        for it in items:
            self._prompts[it.request_id] = len(it.prompt_token_ids)
        release, self._releases = self._releases, []
        await self.d.reserve_batch.remote([ReserveItem(it.request_id, it.prompt_token_ids)
                                           for it in items], release)
        await self.p.submit_prefills.remote([PrefillJob(it.request_id, it.prompt_token_ids, [],
                                                        it.params, "127.0.0.1:1")
                                             for it in items])

    async def _poll(self) -> None:
        async for ref in self.p.stream_results.options(num_returns="streaming").remote(0):
            results, _, _ = await ref
            if results:
                self._spawn(self._finish(results))

    async def _finish(self, results) -> None:
        if self.journal is not None:
            self.journal.tokens([(r.request_id, [r.token_id], [r.text]) for r in results])
            for r in results:
                self.journal.finish(r.request_id, "length", {
                    "prompt_tokens": self._prompts.pop(r.request_id, 0), "output_tokens": 1})
        self._releases += [r.request_id for r in results]
        self.done += len(results)

    async def count(self) -> int:
        return self.done


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ----- (a) throughput ---------------------------------------------------------------------
class NoopActor:
    async def f(self, x=None):
        return None

    async def pid(self) -> int:
        return os.getpid()


def ray_call_cost(n: int = 2000, window: int = 256) -> dict:
    """Calibration: a no-op async actor call from the driver (a 128-int list
    argument, like a prompt), ``window`` outstanding: calls/s and CPU per call."""
    import ray

    a = ray.remote(NoopActor).options(num_cpus=0, max_concurrency=1000).remote()
    pid = ray.get(a.pid.remote())
    arg = list(range(128))

    async def go(count):
        sem = asyncio.Semaphore(window)

        async def one():
            async with sem:
                await a.f.remote(arg)
        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(go(200))
    c0, d0, t0 = cpu_s(pid), cpu_s(os.getpid()), time.perf_counter()
    asyncio.run(go(n))
    dt = time.perf_counter() - t0
    out = {"calls_per_s": n / dt, "callee_cpu_ms_per_call": (cpu_s(pid) - c0) * 1e3 / n,
           "caller_cpu_ms_per_call": (cpu_s(os.getpid()) - d0) * 1e3 / n}
    ray.kill(a, no_restart=True)
    return out


def start_stubs(cfg, name: str) -> tuple[dict, dict]:
    import ray

    from workers.gpu import placement_options

    workers, pids = {}, {}
    for pool in cfg.pools:
        cls = StubPrefill if pool.role == "prefill" else StubDecode
        for i in range(pool.replicas):
            wid = f"{name}/{pool.name}/{i}"
            h = ray.remote(cls).options(max_concurrency=1000, **placement_options(
                pool.gpu_type, 0)).remote(wid, pool.gpu_type, pool.max_num_seqs, pool.block_size)
            workers[wid] = (pool.role, pool.gpu_type, h)
    ray.get([h.ping.remote() for _, _, h in workers.values()])
    for wid, (_, _, h) in workers.items():
        pids[f"stub {wid.split('/', 1)[1]}"] = ray.get(h.pid.remote())
    return workers, pids


def run_throughput(redis_server, n_main: int, prompt_len: int, window: int, submit_batch: int,
                   in_flight: int, profile_s: float, py_spy: str, floors: bool, n_floor: int,
                   say) -> dict:
    import ray
    import redis

    from cluster.config import load_config
    from cluster.controller import Controller, SubmitItem
    from workers.sampling import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(prompt_len)] for _ in range(64)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    r = redis.Redis.from_url(redis_server.url)

    def measure(label: str, ctl, pids: dict, finished, warm: int, n: int) -> dict:
        errors: dict[str, int] = {}

        async def submit_all(count: int, prefix: str) -> tuple[float, int]:
            """``submit_many`` calls of ``submit_batch`` requests, at most
            ``window`` requests in calls not yet answered and (closed loop,
            if ``in_flight``) at most ``in_flight`` submitted, not finished."""
            sem = asyncio.Semaphore(max(1, window // submit_batch))
            ok = 0
            base = finished()

            async def one(first: int):
                nonlocal ok
                items = [SubmitItem(f"{prefix}-{i}", prompts[i % len(prompts)], params)
                         for i in range(first, min(first + submit_batch, count))]
                try:
                    outcomes = await ctl.submit_many.remote(items)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    cause = getattr(exc, "cause", None) or exc
                    errors[type(cause).__name__] = (errors.get(type(cause).__name__, 0)
                                                    + len(items))
                    return
                finally:
                    sem.release()
                for o in outcomes:
                    if o.error:
                        errors[o.error] = errors.get(o.error, 0) + 1
                    else:
                        ok += 1

            async def room(sent: int) -> None:
                while in_flight and sent + submit_batch - (finished() - base) > in_flight:
                    await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            calls = []
            for first in range(0, count, submit_batch):
                await room(first)
                await sem.acquire()
                calls.append(asyncio.ensure_future(one(first)))
            await asyncio.gather(*calls)
            return time.perf_counter() - t0, ok

        progress: dict = {}

        def wait_done(target: int, stall_s: float = 20.0) -> int:
            """Until ``target`` requests finished, or no progress for ``stall_s``
            (requests that never finish); ``progress`` keeps the time and CPU
            counters of the last progress seen, so a stall is not counted."""
            last, t_last = -1, time.monotonic()
            while (got := finished()) < target:
                if got != last:
                    last, t_last = got, time.monotonic()
                    progress.update(t=time.perf_counter(),
                                    cpu={k: cpu_s(p) for k, p in pids.items()})
                elif time.monotonic() - t_last > stall_s:
                    return got
                time.sleep(0.005)
            progress.update(t=time.perf_counter(), cpu={k: cpu_s(p) for k, p in pids.items()})
            return got

        base = finished()
        _, ok_w = asyncio.run(submit_all(warm, "warm"))
        base = wait_done(base + ok_w)
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        t0 = time.perf_counter()
        submit_s, ok = asyncio.run(submit_all(n, "req"))
        done = wait_done(base + ok) - base
        total_s, cpu1 = progress["t"] - t0, progress["cpu"]
        say(f"  {label}: {done / total_s:.0f} finished/s"
            + (f"; submit errors {errors}" if errors else "")
            + (f"; {ok - done} accepted requests never finished" if done < ok else ""))
        return {"path": label, "requests": n, "submit_s": submit_s, "total_s": total_s,
                "submitted_per_s": ok / submit_s, "finished_per_s": done / total_s,
                "accepted": ok, "finished": done, "submit_errors": errors,
                "cpu_s_per_1000": {k: (cpu1[k] - cpu0[k]) * 1000 / max(done, 1) for k in pids},
                "_submit_all": submit_all, "_wait_done": wait_done, "_base": base + done}

    cfg = load_config("tiny-disagg")
    warm = min(200, n_main)
    rows, prof = [], {}
    variants = [("controller", None)] + ([("floor: Ray calls + Redis journal", True),
                                          ("floor: Ray calls only", False)] if floors else [])
    for label, with_redis in variants:
        name = f"cp-{os.getpid()}-{len(rows)}"
        cfg_i = replace(cfg, name=name,
                        redis=replace(cfg.redis, url=redis_server.url, namespace=name),
                        admission=replace(cfg.admission, max_waiting=max(n_main, 1024)))
        workers, stub_pids = start_stubs(cfg_i, name)
        if with_redis is None:
            class BenchController(Controller):  # the real controller, plus a pid query
                async def pid(self) -> int:
                    return os.getpid()

            ctl = ray.remote(BenchController).options(
                num_cpus=0, max_concurrency=1000).remote(cfg_i, workers)
            ray.get(ctl.start.remote())
            key = f"{name}:completed"

            def finished(key=key) -> int:
                return r.llen(key)
        else:
            ctl = ray.remote(FloorController).options(
                num_cpus=0, max_concurrency=1000).remote(workers, redis_server.url, name,
                                                         with_redis)

            def finished(ctl=ctl) -> int:
                return ray.get(ctl.count.remote())
        pids = {"controller": ray.get(ctl.pid.remote()), **stub_pids,
                "redis-server": redis_server._proc.pid, "driver": os.getpid()}
        n = n_main if with_redis is None else n_floor
        row = measure(label, ctl, pids, finished, warm, n)
        submit_all, wait_done, done_so_far = (row.pop("_submit_all"), row.pop("_wait_done"),
                                              row.pop("_base"))
        if with_redis is None:
            status = ray.get(ctl.status.remote())
            row["status_after"] = {"waiting": status["waiting"], "running": status["running"]}
            if profile_s > 0:
                prof = profile_controller(ctl, pids["controller"], submit_all, wait_done,
                                          done_so_far, profile_s, py_spy, say)
        rows.append(row)
        ray.kill(ctl, no_restart=True)
        for _, _, h in workers.values():
            ray.kill(h, no_restart=True)
    main_row = rows[0]
    calib = ray_call_cost()
    say(f"  Ray no-op actor call: {calib['calls_per_s']:.0f} calls/s")
    return {
        "ray_noop_call": calib,
        "mode": "controller as a Ray actor (as deployed), stub worker actors, real Redis",
        "requests": n_main, "prompt_len": prompt_len, "window": window,
        "submit_batch": submit_batch, "in_flight": in_flight, "warmup": warm,
        **{k: main_row[k] for k in ("submit_s", "total_s", "submitted_per_s", "finished_per_s",
                                    "cpu_s_per_1000")},
        "status_after": main_row.get("status_after"), "paths": rows,
        "target_rps": TARGET_RPS, "met": main_row["finished_per_s"] >= TARGET_RPS,
        "profile": prof,
    }


def profile_controller(ctl, pid: int, submit_all, wait_done, done_so_far: int, seconds: float,
                       py_spy: str, say) -> dict:
    """py-spy the controller actor while it handles another batch of requests."""
    out_file = Path(tempfile.mkdtemp(prefix="cpprof-")) / "controller.txt"
    say(f"profiling the controller with {py_spy} for {seconds:.0f} s ...")
    proc = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration",
                             str(int(seconds)), "--format", "raw", "-o", str(out_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    sent = 0
    t_end = time.monotonic() + seconds - 1
    while time.monotonic() < t_end:
        _, ok = asyncio.run(submit_all(500, f"prof{sent}"))
        sent += 500
        done_so_far = wait_done(done_so_far + ok)
    proc.wait(timeout=120)
    return {**summarize_py_spy(out_file), "requests": sent}


def summarize_py_spy(raw_file: Path, top_n: int = 30) -> dict:
    """Inclusive share of each frame (function + file) over the samples where
    the process was doing something (not the event loop waiting for I/O), and
    the leaf frames' own ("self") share."""
    incl: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0

    def name(f: str) -> str:
        return f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
    text = raw_file.read_text() if raw_file.exists() else ""
    for line in text.splitlines():
        stack, _, cnt = line.rpartition(" ")
        frames = stack.split(";")
        if any(x in frames[-1] for x in ("select", "epoll", "_run_once (asyncio/base_events",
                                         "wait (threading", "get (queue")):
            continue  # waiting for I/O or for work
        total += int(cnt)
        for fr in {name(f) for f in frames[1:]}:
            incl[fr] = incl.get(fr, 0) + int(cnt)
        leaf[name(frames[-1])] = leaf.get(name(frames[-1]), 0) + int(cnt)
    top = sorted(incl.items(), key=lambda kv: -kv[1])[:top_n]
    top_leaf = sorted(leaf.items(), key=lambda kv: -kv[1])[:top_n]
    return {"active_samples": total,
            "inclusive": [(k, v / max(total, 1)) for k, v in top],
            "self": [(k, v / max(total, 1)) for k, v in top_leaf]}


# ----- (b) inter-token latency ----------------------------------------------------------------
def inprocess_times(prompt: list[int], max_tokens: int) -> list[float]:
    import torch

    from workers.engine import EngineConfig, LLMEngine
    from workers.sampling import SamplingParams

    torch.set_num_threads(1)
    engine = inprocess_times.engine = getattr(inprocess_times, "engine", None) or LLMEngine(
        EngineConfig(kv_cache_bytes=128 * MIB))
    rid = f"ip-{time.perf_counter_ns()}"
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                   ignore_eos=True))
    times, tokens = [], []
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id == rid:
                times += [now] * len(out.new_token_ids)
                tokens += out.new_token_ids
    inprocess_times.tokens = tokens
    return times


async def cluster_times(cluster_name: str, prompt: list[int], max_tokens: int, rid: str,
                        generator: bool = False):
    """Stream one request through the cluster: with ``ClusterClient.generate``
    (its Redis output channel plus a lazy ``Controller.stream_chunks``), or
    with ``generator``, one plain ``stream_chunks`` call made here."""
    from cluster.ray_client import ClusterClient
    from workers.sampling import SamplingParams

    client = ClusterClient(cluster_name)
    ctl = await client.controller()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    times, chunks, tokens, ctl_times = [], [], [], []

    async def chunks_of():
        if not generator:
            async for chunk in client.generate(prompt, params, request_id=rid):
                yield chunk
            return
        await client.submit(prompt, params, request_id=rid)
        async for ref in ctl.stream_chunks.options(num_returns="streaming").remote(rid, 0):
            yield await ref
    async for chunk in chunks_of():
        now = time.perf_counter()
        times += [now] * len(chunk.token_ids)
        ctl_times += chunk.token_times
        tokens += chunk.token_ids
        if chunk.token_ids:
            chunks.append((now, len(chunk.token_ids)))
    return times, chunks, tokens, ctl_times


def grpc_times(client, prompt: list[int], max_tokens: int, rid: str):
    """Stream one request through the cluster's own gRPC frontend (served by
    the controller process) with ``cluster.client.BatonClient.stream``, token
    ids in; a token's time = when the message carrying it reached the client."""
    from cluster.client import Delta

    times, chunks, tokens = [], [], []
    for item in client.stream(prompt, request_id=rid, max_tokens=max_tokens, temperature=0.0,
                              ignore_eos=True):
        now = time.perf_counter()
        if isinstance(item, Delta) and item.token_ids:
            times += [now] * len(item.token_ids)
            tokens += item.token_ids
            chunks.append((now, len(item.token_ids)))
    return times, chunks, tokens, []


def schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of one thread."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        on_cpu, wait, _ = f.read().split()
    return int(on_cpu) / 1e9, int(wait) / 1e9


def _engine_probe(self):  # runs inside the decode worker actor (via __ray_call__)
    import threading

    tid = next(t.native_id for t in threading.enumerate() if t.name == "engine-loop")
    return os.getpid(), tid, self.engine.stats.steps, self.engine.stats.busy_s


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process, summed by thread name (the
    kernel's 15-character ``comm``: Ray's C++ threads have their own names)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue  # the thread ended
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[comm] = out.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_delta_ms(before: dict, after: dict, tokens: int) -> dict[str, float]:
    """Per-thread-name CPU ms per token between two ``thread_cpu_s`` readings."""
    return {k: (v - before.get(k, 0.0)) * 1e3 / tokens for k, v in after.items()
            if v - before.get(k, 0.0) > 0}


def gaps_ms(times: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(times, times[1:])]


# path -> how its tokens are streamed (see ``stream_path``)
CLUSTER_PATHS = ("cluster", "cluster_gen", "grpc")
PATH_LABELS = {"cluster": "cluster, ClusterClient.generate",
               "cluster_gen": "cluster, plain Controller.stream_chunks generator",
               "grpc": "cluster, gRPC frontend (BatonClient.stream)"}


def stream_path(path: str, cfg_name: str, grpc_client, prompt: list[int], max_tokens: int,
                rid: str):
    if path == "grpc":
        return grpc_times(grpc_client, prompt, max_tokens, rid)
    return asyncio.run(cluster_times(cfg_name, prompt, max_tokens, rid, path == "cluster_gen"))


def run_itl(redis_server, prompt_len: int, max_tokens: int, reps: int, say,
            profile_s: float = 0.0, py_spy: str = "py-spy") -> dict:
    import threading

    import ray

    from cluster.client import BatonClient
    from cluster.config import load_config
    from cluster.launcher import Deployment

    cfg = load_config("tiny-disagg")
    name = f"itl-{os.getpid()}"
    cfg = replace(cfg, name=name, transport="grpc",
                  redis=replace(cfg.redis, url=redis_server.url, namespace=name),
                  server=replace(cfg.server, host="127.0.0.1", auth_token_env=None))
    dep = Deployment(cfg).start()
    grpc_port = ray.get(dep.controller.start_frontends.remote(0, 0))["grpc_port"]
    grpc_client = BatonClient(f"127.0.0.1:{grpc_port}")
    decode = next(h for role, _, h in dep.workers.values() if role == "decode")
    ctl_pid = ray.get(dep.controller.__ray_call__.remote(lambda self: os.getpid()))
    my_tid = threading.get_native_id()
    rng = random.Random(1)
    gaps = {k: [] for k in ("inprocess", *CLUSTER_PATHS)}
    chunk_gaps = {k: [] for k in CLUSTER_PATHS}
    chunk_sizes = {k: [] for k in CLUSTER_PATHS}
    ctl_gaps = {k: [] for k in CLUSTER_PATHS}
    diag = {k: [] for k in ("inprocess", *CLUSTER_PATHS)}
    same = True
    pids = {"decode worker": ray.get(decode.__ray_call__.remote(_engine_probe))[0],
            "controller": ctl_pid, "client (driver)": os.getpid(),
            "redis": redis_server._proc.pid}
    profiles = {}
    try:
        for rep in range(reps + 1):  # rep 0 = warm-up of each
            prompt = [rng.randrange(256) for _ in range(prompt_len)]
            # in-process
            eng = getattr(inprocess_times, "engine", None)
            s0 = (eng.stats.steps, eng.stats.busy_s) if eng else (0, 0.0)
            x0, t0 = schedstat(os.getpid(), my_tid), time.perf_counter()
            t_ip = inprocess_times(prompt, max_tokens)
            dt, x1 = time.perf_counter() - t0, schedstat(os.getpid(), my_tid)
            eng = inprocess_times.engine
            ref = list(inprocess_times.tokens)
            if rep:
                diag["inprocess"].append({
                    "busy_ms_per_step": (eng.stats.busy_s - s0[1]) * 1e3 / (eng.stats.steps - s0[0]),
                    "engine_thread_on_cpu": (x1[0] - x0[0]) / dt,
                    "engine_thread_runq_wait": (x1[1] - x0[1]) / dt})
                gaps["inprocess"] += gaps_ms(t_ip)
            line = f"  itl rep {rep}/{reps}: in-process p50 {pct(gaps_ms(t_ip), .5):.2f} ms"
            for path in CLUSTER_PATHS:
                pid, tid, st0, b0 = ray.get(decode.__ray_call__.remote(_engine_probe))
                y0, cpu0 = schedstat(pid, tid), {k: cpu_s(p) for k, p in pids.items()}
                th0 = {k: thread_cpu_s(p) for k, p in pids.items()}
                t0 = time.perf_counter()
                t_cl, chunks, tokens, ctl_t = stream_path(path, cfg.name, grpc_client, prompt,
                                                          max_tokens, f"itl-{path}-{rep}")
                dt = time.perf_counter() - t0
                y1, cpu1 = schedstat(pid, tid), {k: cpu_s(p) for k, p in pids.items()}
                th1 = {k: thread_cpu_s(p) for k, p in pids.items()}
                _, _, st1, b1 = ray.get(decode.__ray_call__.remote(_engine_probe))
                same = same and tokens == ref
                if rep == 0:
                    continue
                cpu_tok = {k: (cpu1[k] - cpu0[k]) * 1e3 / len(tokens) for k in cpu0}
                cpu_tok["decode worker"] -= (y1[0] - y0[0]) * 1e3 / len(tokens)  # minus its engine
                diag[path].append({
                    "busy_ms_per_step": (b1 - b0) * 1e3 / max(1, st1 - st0),
                    "engine_thread_on_cpu": (y1[0] - y0[0]) / dt,
                    "engine_thread_runq_wait": (y1[1] - y0[1]) / dt,
                    "control_plane_cpu_ms_per_token": cpu_tok,
                    "threads_cpu_ms_per_token": {k: thread_delta_ms(th0[k], th1[k], len(tokens))
                                                 for k in pids}})
                gaps[path] += gaps_ms(t_cl)
                ctl_gaps[path] += gaps_ms(ctl_t)
                chunk_gaps[path] += gaps_ms([t for t, _ in chunks])
                chunk_sizes[path] += [k for _, k in chunks]
                line += f", {path} p50 {pct(gaps_ms(t_cl), .5):.2f} ms ({len(chunks)} chunks)"
            if rep:
                say(line)
        if profile_s > 0:
            profiles = profile_itl(pids, profile_s, py_spy, say, lambda path, i: stream_path(
                path, cfg.name, grpc_client, [rng.randrange(256) for _ in range(prompt_len)],
                max_tokens, f"itl-prof-{path}-{i}"))
    finally:
        grpc_client.close()
        dep.shutdown()
    ip50 = pct(gaps["inprocess"], 0.5)

    def avg(side, key):
        return statistics.fmean(d[key] for d in diag[side])

    def path_report(path: str) -> dict:
        cp_keys = diag[path][0]["control_plane_cpu_ms_per_token"]
        p50 = pct(gaps[path], 0.5)
        return {
            "itl_p50_ms": p50, "itl_mean_ms": statistics.fmean(gaps[path]),
            "itl_p90_ms": pct(gaps[path], 0.9),
            "controller_itl_p50_ms": pct(ctl_gaps[path], 0.5) if ctl_gaps[path] else None,
            "chunk_gap_p50_ms": pct(chunk_gaps[path], 0.5),
            "tokens_per_chunk_mean": statistics.fmean(chunk_sizes[path]),
            "added_p50_ms": p50 - ip50,
            "added_mean_ms": statistics.fmean(gaps[path]) - statistics.fmean(gaps["inprocess"]),
            "control_plane_cpu_ms_per_token": {
                k: statistics.fmean(d["control_plane_cpu_ms_per_token"][k] for d in diag[path])
                for k in cp_keys},
            "threads_cpu_ms_per_token": _mean_threads(d["threads_cpu_ms_per_token"]
                                                      for d in diag[path]),
            "met": p50 - ip50 <= TARGET_ITL_ADDED_MS}
    paths = {path: path_report(path) for path in CLUSTER_PATHS}
    main_path = paths["cluster"]
    return {
        "model": "tiny", "prompt_len": prompt_len, "max_tokens": max_tokens, "reps": reps,
        "inprocess_itl_p50_ms": ip50, "inprocess_itl_mean_ms": statistics.fmean(gaps["inprocess"]),
        "inprocess_itl_p90_ms": pct(gaps["inprocess"], 0.9),
        "cluster_itl_p50_ms": main_path["itl_p50_ms"], "added_p50_ms": main_path["added_p50_ms"],
        "paths": paths, "tokens_identical": same,
        "diagnostics": {
            side: {k: avg(side, k) for k in ("busy_ms_per_step", "engine_thread_on_cpu",
                                             "engine_thread_runq_wait")}
            for side in diag},
        "profiles": profiles,
        "target_added_ms": TARGET_ITL_ADDED_MS, "met": main_path["met"],
    }


def _mean_threads(runs) -> dict[str, dict[str, float]]:
    """Mean over runs of {process: {thread name: CPU ms per token}}."""
    runs = list(runs)
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        for proc, threads in run.items():
            for t, v in threads.items():
                out.setdefault(proc, {})[t] = out.get(proc, {}).get(t, 0.0) + v / len(runs)
    return {p: dict(sorted(ts.items(), key=lambda kv: -kv[1])) for p, ts in out.items()}


def profile_itl(pids: dict, seconds: float, py_spy: str, say, run_one) -> dict:
    """py-spy (raw, non-blocking) the decode worker, the controller and the
    driver while requests of each cluster path stream one at a time for
    ``seconds``; returns each process's summary per path."""
    out = {}
    for path in CLUSTER_PATHS:
        tmp = Path(tempfile.mkdtemp(prefix=f"itlprof-{path}-"))
        say(f"profiling {path} with {py_spy} for {seconds:.0f} s ...")
        procs = {k: subprocess.Popen(
            [py_spy, "record", "--pid", str(p), "--duration", str(int(seconds)), "--rate", "250",
             "--nonblocking", "--format", "raw", "-o", str(tmp / f"{k.split()[0]}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for k, p in pids.items() if k != "redis"}
        time.sleep(1.0)
        t_end, i = time.monotonic() + seconds - 1.5, 0
        while time.monotonic() < t_end:
            run_one(path, i)
            i += 1
        for proc in procs.values():
            proc.wait(timeout=120)
        out[path] = {k: {**summarize_py_spy(tmp / f"{k.split()[0]}.txt"), "requests": i}
                     for k in procs}
    return out


# ----- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("throughput", "itl"), default=None)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--window", type=int, default=256,
                    help="requests in submit_many calls not yet answered, at most")
    ap.add_argument("--submit-batch", type=int, default=64,
                    help="requests per submit_many call")
    ap.add_argument("--in-flight", type=int, default=1024,
                    help="closed loop: requests submitted but not finished, at most "
                         "(the example's admission.max_waiting); 0 = open loop")
    ap.add_argument("--floor-requests", type=int, default=5000,
                    help="requests for each floor peer")
    ap.add_argument("--no-floors", action="store_true",
                    help="skip the floor peers (same Ray calls / Redis writes, no controller)")
    ap.add_argument("--itl-prompt-len", type=int, default=128)
    ap.add_argument("--itl-tokens", type=int, default=128)
    ap.add_argument("--itl-reps", type=int, default=3)
    ap.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                    help="also py-spy the controller under load for SECONDS")
    ap.add_argument("--itl-profile", type=float, default=0.0, metavar="SECONDS",
                    help="also py-spy the decode worker, controller and driver while each "
                         "cluster path streams for SECONDS")
    ap.add_argument("--threads", action="store_true",
                    help="print each process's CPU per token by thread name")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write JSON to this file ('-' or no value: stdout)")
    args = ap.parse_args(argv)

    import ray

    from cluster.redis_server import RedisServer

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json == "-" else \
        (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()
    report = {"benchmark": "control_plane", "date": time.strftime("%Y-%m-%d"),
              "machine": f"CPU, {os.cpu_count()} cores, no GPU ({platform.machine()})"}
    with RedisServer() as redis_server:
        ray.init(address="local", num_cpus=2,
                 resources={"gpu_type:H100": 4, "gpu_type:L40S": 4},
                 object_store_memory=256 * MIB, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        try:
            if args.only in (None, "throughput"):
                say(f"(a) {args.requests} requests through the controller, stub workers ...")
                report["throughput"] = run_throughput(redis_server, args.requests,
                                                      args.prompt_len, args.window,
                                                      args.submit_batch, args.in_flight,
                                                      args.profile, args.py_spy,
                                                      not args.no_floors, args.floor_requests,
                                                      say)
            if args.only in (None, "itl"):
                say(f"(b) ITL: tiny model, {args.itl_tokens} tokens, in-process vs cluster ...")
                report["itl"] = run_itl(redis_server, args.itl_prompt_len, args.itl_tokens,
                                        args.itl_reps, say, args.itl_profile, args.py_spy)
        finally:
            ray.shutdown()
    report["wall_s"] = time.perf_counter() - t_start
    emit_report(report, args.json, lambda r: print_tables(r, args.threads))
    return 0


def print_tables(report: dict, threads: bool = False) -> None:
    t = report.get("throughput")
    if t:
        print(f"\n(a) controller throughput: {t['requests']} requests "
              f"({t['prompt_len']}-token prompts, max_tokens 1), window {t['window']}, "
              f"submit_many of {t.get('submit_batch', 1)}, in flight "
              f"{t.get('in_flight') or 'unbounded'}; {t['mode']}")
        keys = list(t["paths"][0]["cpu_s_per_1000"])
        head = (f"{'path':<34} {'requests':>8} {'submit/s':>8} {'finished/s':>10} "
                + " ".join(f"{k.replace('stub ', ''):>12}" for k in keys))
        print("CPU columns: CPU seconds per 1,000 requests of each process")
        print(head + "\n" + "-" * len(head))
        for row in t["paths"]:
            print(f"{row['path']:<34} {row['requests']:>8} {row['submitted_per_s']:>8.0f} {row['finished_per_s']:>10.0f} "
                  + " ".join(f"{row['cpu_s_per_1000'][k]:>12.2f}" for k in keys))
        for row in t["paths"]:
            if row["submit_errors"] or row["finished"] < row["accepted"]:
                print(f"  !! {row['path']}: submit errors {row['submit_errors']}, "
                      f"{row['accepted'] - row['finished']} accepted requests never finished")
        c = t["ray_noop_call"]
        print(f"calibration, Ray no-op async actor call from the driver: {c['calls_per_s']:.0f} "
              f"calls/s, CPU {c['caller_cpu_ms_per_call']:.2f} ms caller + "
              f"{c['callee_cpu_ms_per_call']:.2f} ms callee per call")
        print(f"target >= {t['target_rps']:.0f} req/s: {t['finished_per_s']:.0f} -> "
              f"{'MET' if t['met'] else 'MISSED'}")
        if t.get("profile"):
            p = t["profile"]
            print(f"\ncontroller profile (py-spy, {p['active_samples']} active samples, "
                  f"{p['requests']} requests): inclusive share, top frames")
            for k, v in p["inclusive"]:
                print(f"  {v * 100:5.1f}%  {k}")
    i = report.get("itl")
    if i:
        print(f"\n(b) inter-token latency: tiny model, {i['prompt_len']}-token prompt, "
              f"{i['max_tokens']} tokens greedy, {i['reps']} runs each (pooled), ms")
        head = f"{'path':<52} {'p50':>7} {'mean':>7} {'p90':>7} {'added p50':>9}"
        print(head + "\n" + "-" * len(head))
        print(f"{'in-process LLMEngine.step() loop':<52} {i['inprocess_itl_p50_ms']:>7.2f} "
              f"{i['inprocess_itl_mean_ms']:>7.2f} {i['inprocess_itl_p90_ms']:>7.2f}")
        for path, p in i["paths"].items():
            print(f"{PATH_LABELS[path]:<52} {p['itl_p50_ms']:>7.2f} {p['itl_mean_ms']:>7.2f} "
                  f"{p['itl_p90_ms']:>7.2f} {p['added_p50_ms']:>+9.2f}")
            at_ctl = p["controller_itl_p50_ms"]
            print(f"{'  at the controller (token_times)':<52} "
                  + (f"{at_ctl:>7.2f}" if at_ctl is not None else f"{'-':>7}")
                  + f"   ({p['tokens_per_chunk_mean']:.2f} tokens per chunk)")
            cp = p["control_plane_cpu_ms_per_token"]
            print("  control-plane CPU per streamed token (ms): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in cp.items())
                  + f"; total {sum(cp.values()):.2f}")
            if threads:
                for proc, ts in p["threads_cpu_ms_per_token"].items():
                    print(f"    {proc}: " + ", ".join(f"{t} {v:.2f}" for t, v in ts.items()
                                                      if v >= 0.01))
        d = i["diagnostics"]
        print("decode engine, per step (model forward) and its thread's share of wall time:")
        for side in d:
            print(f"  {side:<11} busy {d[side]['busy_ms_per_step']:6.2f} ms/step, on a CPU "
                  f"{d[side]['engine_thread_on_cpu'] * 100:3.0f}%, runnable but waiting for a CPU "
                  f"{d[side]['engine_thread_runq_wait'] * 100:3.0f}%")
        print(f"added p50 (ClusterClient): {i['added_p50_ms']:+.2f} ms; target <= "
              f"{i['target_added_ms']:.0f} ms -> {'MET' if i['met'] else 'MISSED'}; "
              f"tokens identical: {i['tokens_identical']}")
        g = i["paths"].get("grpc")
        if g:
            print(f"added p50 (gRPC frontend, what users stream through): "
                  f"{g['added_p50_ms']:+.2f} ms -> {'MET' if g['met'] else 'MISSED'}")
        for path, procs in (i.get("profiles") or {}).items():
            for proc, prof in procs.items():
                print(f"\npy-spy, {PATH_LABELS[path]}, {proc} ({prof['active_samples']} active "
                      f"samples, {prof['requests']} requests): self share, top frames")
                for k, v in prof["self"][:12]:
                    print(f"  {v * 100:5.1f}%  {k}")
    print(f"\nwall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())

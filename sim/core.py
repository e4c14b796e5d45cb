"""The discrete-event simulation of one cluster run.

Lifecycle::

    Simulation(spec, workload)      builds workers (one per replica), the
                                    controller with the policies named in
                                    the spec, the KV links, the trackers
    run()                           pushes the arrivals, then pops events in
                                    (time, kind, id) order until none is
                                    left; returns a ``SimResult``

Event flow of one request (disaggregated)::

    ARRIVAL -> controller.arrive -> DISPATCH round -> decode.reserve,
    prefill.submit -> WAKE / STEP_DONE ... (prefill chunks) -> transfer
    planned during the last chunk -> TRANSFER_DONE -> prefill.release,
    decode.land -> STEP_DONE ... (decode steps or fast-forwarded windows
    of them; see sim.workers) -> finish

Colocated: the mixed worker prefills and decodes; no transfer.

Ranked policies: every request gets its simulated score on arrival; with
``SimSpec.ranker_prompt_s`` > 0 it waits unscored until ``sim.ranker`` lands
it (ARRIVAL -> controller.arrive, ranker.arrive -> ... LANDED ->
controller.rescore), as the real controller's ranker does.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import attrgetter

from cluster.policies import BoundedQueue, make_router, scheduler_from_spec
from sim.events import ARRIVAL, LANDED, Clock, EventQueue
from sim.hardware import get_gpu
from sim.latency import LatencyModel, kv_blocks_from_memory, kv_bytes_per_token, profile_for
from sim.metrics import RunSummary, WorkerUsage, summarize
from sim.models import get_model
from sim.spec import SimPool, SimSpec
from sim.tracker import Tracker
from sim.transfer import Link, TransferNetwork
from sim.workers import Hooks, SimWorker, WorkerSpec
from sim.workload import Request, Workload
from workers.batch_planner import BatchConfig

_BY_ARRIVAL = attrgetter("arrival_s")  # requests by arrival time
_BY_INDEX = attrgetter("req.index")  # trackers in workload order
# allocations (net) between two young-generation collections in the event loop
# (CPython's default: 700, about one collection per 700 requests)
_LOOP_GC_THRESHOLD = 100_000


@dataclass
class SimResult:
    summary: RunSummary
    trackers: list[Tracker]  # every request, in workload order
    workers: list[SimWorker]
    dispatch_order: list[str]  # request ids in the order the router placed them
    wall_s: float  # host seconds the run took
    events: int  # events processed
    extra: dict = field(default_factory=dict)


class Simulation:
    def __init__(self, spec: SimSpec, workload: Workload, progress: bool = False,
                 profiles: dict | None = None):
        self.spec, self.workload, self.progress = spec, workload, progress
        self.model = get_model(spec.model)
        self.events, self.clock = EventQueue(), Clock()
        self.hooks = self._hooks()
        self.pools = {p.name: self._build_pool(p, profiles) for p in spec.pools}
        workers = [w for ws in self.pools.values() for w in ws]
        self.prefill = [w for w in workers if w.spec.role in ("prefill", "mixed")]
        self.decode = [w for w in workers if w.spec.role in ("decode", "mixed")]
        if not spec.disaggregated:
            self.decode = self.prefill
        self.by_id = {w.worker_id: w for w in workers}
        self.links = {w.worker_id: Link(w.worker_id, self._nic_bw(w)) for w in workers}
        self.network = TransferNetwork(self.events, self.clock, spec.link_latency_s)
        self.controller = self._controller()
        self.hooks.on_change = self.controller.request_round  # the hottest hook: no hop
        self.hooks.waiting = self.controller.waiting
        self.trackers: list[Tracker] = []
        self._upcoming: Iterator[Request] = iter(())  # requests not yet in the event queue
        self._done = 0
        self._ranker = random.Random(spec.seed ^ 0x5EED)
        self.scorer = self._scorer()  # None: every request is scored the moment it arrives
        self._arrive = self.controller.arrive if self.scorer is None else self._arrive_unscored

    # ----- construction -----------------------------------------------------------------
    def _build_pool(self, p: SimPool, profiles) -> list[SimWorker]:
        gpu = get_gpu(p.gpu_type, self.spec.prices)
        latency = LatencyModel(self.model, gpu, p.tensor_parallel, self.spec.dtype,
                               profile_for(gpu.name, profiles))
        blocks = self._kv_blocks(p, gpu)
        batch = BatchConfig(p.max_num_seqs, p.max_num_batched_tokens, p.prefill_chunk_size)
        return [SimWorker(WorkerSpec(f"{p.name}-{i}", p.role, gpu.name, p.tensor_parallel, batch,
                                     blocks, p.block_size, self.spec.prefix_caching,
                                     self.spec.prefill_step_noise, self.spec.seed + i),
                          latency, self.events, self.clock, self.hooks, self.spec.fast_forward)
                for i in range(p.replicas)]

    def _kv_blocks(self, p: SimPool, gpu) -> int:
        per_token = kv_bytes_per_token(self.model, p.tensor_parallel, self.spec.dtype)
        if self.spec.kv_from == "config":
            blocks = p.kv_cache_bytes // (per_token * p.block_size)
        else:
            blocks = kv_blocks_from_memory(self.model, gpu, p.tensor_parallel, self.spec.dtype,
                                           p.block_size, self.spec.memory_utilization)
        # more blocks than 2 x max_num_seqs full-length sequences could never be used
        cap = 2 * p.max_num_seqs * -(-self.model.max_model_len // p.block_size)
        if blocks <= 0:
            raise ValueError(f"pool {p.name}: KV cache of {p.kv_cache_bytes} bytes holds no "
                             f"{p.block_size}-token block ({per_token} bytes/token)")
        return int(min(blocks, cap))

    def _nic_bw(self, w: SimWorker) -> float:
        if self.spec.link_bandwidth is not None:
            return self.spec.link_bandwidth
        return get_gpu(w.spec.gpu_type).network_bw * w.spec.tensor_parallel

    def _controller(self):
        from sim.controller import SimController
        return SimController(scheduler_from_spec(self.spec.scheduler), make_router(self.spec.router),
                             BoundedQueue(self.spec.max_waiting), self.prefill, self.decode,
                             self.events, self.clock, self._on_reject,
                             use_prefix_index=self.spec.router == "prefix-aware",
                             max_model_len=self.model.max_model_len,
                             dispatch_s=self.spec.control.dispatch_s,
                             scores_later=self.spec.ranker_prompt_s > 0)

    def _scorer(self):
        if not self.spec.ranker_prompt_s:
            return None
        from sim.ranker import SimRanker
        return SimRanker(self.events, self.clock, self.controller.rescore,
                         self.spec.ranker_prompt_s, self.spec.ranker_chunk,
                         self.spec.ranker_max_batch)

    def _hooks(self) -> Hooks:
        h = Hooks()
        h.on_first_token = self._on_first_token
        h.on_finish = self._on_finish
        h.on_change = self._on_change  # replaced by the controller's own, once it exists
        h.on_plan_prefill_done = self._on_plan_prefill_done
        h.waiting = []  # the controller's own list, once it exists
        return h

    # ----- the run ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        # requests known up front enter the event queue one at a time: a small heap
        self._upcoming = iter(sorted(self.workload.initial(), key=_BY_ARRIVAL))
        self._push_upcoming()
        # the workload's requests, and the finished requests' trackers, live until the
        # run ends: the cyclic collector's full passes would walk them all again and
        # again (5% of a million-request run); frozen (here, and in _on_finish) they
        # are skipped. The loop makes no cyclic garbage: its young objects (a
        # request's sequence, block table, trackers) are walked far less often too
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(_LOOP_GC_THRESHOLD, *thresholds[1:])
        try:
            n = self._loop(_progress_bar(self.workload.num_requests) if self.progress else None)
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        wall = time.perf_counter() - t_wall
        summary = summarize(self.trackers, self._usage(), self.spec.slo)
        summary.extra = self._facts(n)
        return SimResult(summary, sorted(self.trackers, key=_BY_INDEX),
                         list(self.by_id.values()), self.controller.dispatch_order, wall, n)

    def _loop(self, bar) -> int:
        """Pop and call every event (``EventQueue.pop`` inlined: the hottest loop)."""
        heap, clock, n, pop = self.events.heap, self.clock, 0, heapq.heappop
        if bar is None:
            while heap:
                clock.now, _, _, fn, arg = pop(heap)
                fn(arg)
                n += 1
            return n
        last_done = 0
        while heap:
            clock.now, _, _, fn, arg = pop(heap)
            fn(arg)
            n += 1
            if self._done - last_done >= 1000:
                bar.update(self._done - last_done)
                last_done = self._done
        bar.update(self._done - last_done)
        bar.close()
        return n

    def _push_upcoming(self) -> None:
        req = next(self._upcoming, None)
        if req is not None:
            self._push_arrival(req, self._arrive_upcoming)

    def _arrive_upcoming(self, tr: Tracker) -> None:
        req = next(self._upcoming, None)  # _push_upcoming, written out (once per request)
        if req is not None:
            self._push_arrival(req, self._arrive_upcoming)
        self._arrive(tr)

    def _arrive_unscored(self, tr: Tracker) -> None:
        self.controller.arrive(tr)
        if not tr.rejected:
            self.scorer.arrive(tr)

    def _push_arrival(self, req, on_arrival=None) -> None:
        # the simulated ranker's score: higher = shorter, with log-normal error
        tr = Tracker(req, -math.log(req.output_tokens)
                     + self._ranker.gauss(0.0, self.spec.ranker_noise))
        self.trackers.append(tr)
        self.events.push(req.arrival_s, ARRIVAL, on_arrival or self._arrive, tr)

    # ----- hooks -------------------------------------------------------------------------------
    def _on_change(self) -> None:
        self.controller.request_round()

    def _on_plan_prefill_done(self, tr: Tracker, t0: float, t1: float) -> None:
        src, dst = self.by_id[tr.prefill_worker], self.by_id[tr.decode_worker]
        nbytes = tr.req.prompt_tokens * kv_bytes_per_token(self.model, 1, self.spec.dtype)

        def landed() -> None:
            now, control = self.clock.now, self.spec.control
            tr.transfer_s = now - t1
            src.release(tr)
            self._on_change()
            if control.first_token_waits_for_kv:  # delivered with the prefill result
                tr.first_token_s = tr.last_token_s = now + control.result_s
                if tr.req.output_tokens <= 1:
                    tr.finish_s = tr.first_token_s
                    self._on_finish(tr, tr.finish_s)
            if tr.req.output_tokens <= 1:  # nothing to decode: the reservation goes
                dst.release_reservation(tr)
                return
            delay = control.result_s + control.admit_s
            if delay:
                self.events.push(now + delay, LANDED, dst.land, tr)
            else:
                dst.land(tr)

        self.network.plan(self.links[src.worker_id], self.links[dst.worker_id], nbytes,
                          self.model.num_layers, t0, t1, landed)

    def _on_first_token(self, tr: Tracker, now: float) -> None:
        if tr.req.output_tokens <= 1 and not self.spec.control.first_token_waits_for_kv:
            tr.finish_s = now  # nothing to decode: done at the prefill worker
            self._on_finish(tr, now)

    def _on_finish(self, tr: Tracker, now: float) -> None:
        self._done += 1
        if not self._done & 0xFFFF:
            gc.freeze()  # the trackers finished so far (see run)
        if self.workload.closed:
            nxt = self.workload.next_after(now)
            if nxt is not None:
                self._push_arrival(nxt)

    def _on_reject(self, tr: Tracker) -> None:
        self._on_finish(tr, self.clock.now)

    # ----- results -------------------------------------------------------------------------------
    def _usage(self) -> list[WorkerUsage]:
        out = []
        for w in self.by_id.values():
            gpu = get_gpu(w.spec.gpu_type, self.spec.prices)
            out.append(WorkerUsage(w.worker_id, gpu.name, w.spec.tensor_parallel, w.stats.busy_s,
                                   w.stats.flops, gpu.peak_flops(self.spec.dtype),
                                   gpu.price_per_hour, gpu.idle_power_w, gpu.peak_power_w))
        return out

    def _facts(self, n_events: int) -> dict:
        stats = [w.stats for w in self.by_id.values()]
        return {"model": self.spec.model, "dtype": self.spec.dtype,
                "mode": "disaggregated" if self.spec.disaggregated else "colocated",
                "pools": [f"{p.name}:{p.role}:{p.gpu_type}x{p.tensor_parallel}x{p.replicas}"
                          for p in self.spec.pools],
                "scheduler": self.spec.scheduler.policy, "router": self.spec.router,
                "kv_blocks": {w.worker_id: w.blocks.num_blocks for w in self.by_id.values()},
                "planner_calls": sum(s.planner_calls for s in stats),
                "steps": sum(s.steps for s in stats), "windows": sum(s.windows for s in stats),
                "events": n_events, "transfers": self.network.transfers,
                "transfer_bytes": self.network.total_bytes,
                "dispatch_rounds": self.controller.rounds,
                **({"ranker_calls": self.scorer.calls, "ranker_busy_s": self.scorer.busy_s}
                   if self.scorer else {})}


def _progress_bar(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="req", desc="simulating", disable=None, mininterval=1.0)

"""Simulated workers: the engine's own batch planner and block manager on a
simulated clock.

Lifecycle of a worker (role ``prefill``, ``decode`` or ``mixed``)::

    submit / land  -> inbox (work that arrived during a step)
    step boundary  -> inbox flushed into the planner's waiting deque / running list
                   -> ``BatchPlanner.plan(waiting, running)`` (workers.batch_planner):
                      token budget, chunked prefill, continuous batching, KV
                      blocks (workers.block_manager), preemption
                   -> step time from ``sim.latency`` -> STEP_DONE event
    STEP_DONE      -> computed tokens applied; a chunk that reaches the end of
                      its sequence samples a token (first token: TTFT; a
                      prefill worker then hands the request to its decode
                      worker and keeps its blocks until the KV has left)

Fast-forward (``fast_forward=True``): when every running sequence is decoding
and nothing waits, the planner's next steps are known — one token for each
running sequence, while the KV cache has room — so the worker runs up to the
first finish (or the last step before a new KV block would not fit) as one
window of steps, growing each sequence's blocks with ``BlockManager.append``.
New work cuts the window at the next step boundary, where the planner takes
over again. Step times, token times and block counts are identical to
stepping one by one (``tests/sim/test_fast_forward.py`` checks it).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from cluster.policies import WorkerView
from sim.events import Clock, EventKind, EventQueue
from sim.latency import LatencyModel
from sim.tracker import Tracker
from workers.batch_planner import BatchConfig, BatchPlanner, StepPlan
from workers.block_manager import BlockManager
from workers.sampling import SamplingParams
from workers.sequence import Sequence, SequenceStatus


class State(Enum):
    IDLE = "idle"
    STEP = "step"  # one planned step in flight
    WINDOW = "window"  # a fast-forwarded run of decode steps in flight


@dataclass(frozen=True)
class WorkerSpec:
    """What one simulated worker is."""

    worker_id: str  # e.g. "prefill-0"
    role: str  # prefill | decode | mixed
    gpu_type: str  # catalog name
    tensor_parallel: int  # GPUs in the replica
    batch: BatchConfig  # the planner's limits
    num_kv_blocks: int  # KV capacity
    block_size: int  # tokens per KV block
    enable_prefix_caching: bool  # BlockManager prefix reuse (traces with hash ids)


@dataclass
class WorkerStats:
    busy_s: float = 0.0  # time spent stepping
    steps: int = 0  # engine steps (a window counts each of its steps)
    planner_calls: int = 0  # BatchPlanner.plan calls
    windows: int = 0  # fast-forwarded decode windows
    flops: float = 0.0  # useful FLOPs on one shard
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0


class Hooks:
    """What a worker tells the rest of the simulation (set by the core)."""

    on_first_token: Callable[[Tracker, float], None]  # prefill done on a prefill worker
    on_finish: Callable[[Tracker, float], None]  # last token sampled
    on_change: Callable[[], None]  # load changed: the controller may dispatch
    on_plan_prefill_done: Callable[[Tracker, float, float], None]  # (tracker, t0, t1) KV export


class SimWorker:
    def __init__(self, spec: WorkerSpec, latency: LatencyModel, events: EventQueue,
                 clock: Clock, hooks: Hooks, fast_forward: bool = True):
        self.spec = spec
        self.clock = clock
        self.latency = latency
        self.events = events
        self.hooks = hooks
        self.fast_forward = fast_forward and spec.role != "prefill"
        self.blocks = BlockManager(spec.num_kv_blocks, spec.block_size, spec.enable_prefix_caching)
        self.planner = BatchPlanner(spec.batch, self.blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.inbox: list[Sequence] = []  # landed / submitted during a step
        self.trackers: dict[str, Tracker] = {}
        self.held = 0  # requests assigned and not yet finished or handed off
        self.reserved = 0  # decode: KV reservations whose transfer is in flight
        self.backlog = 0  # prompt tokens still to prefill here
        self.state = State.IDLE
        self.stats = WorkerStats()
        self._version = 0
        self._wake_pending = False
        self._plan: StepPlan | None = None
        self._step_start = 0.0
        self._window: list[float] = []  # end time of each step of the window
        self._window_start = 0.0
        self._window_ctx = 0  # total KV length of the window's first step
        self._window_needs: list[int] = []  # blocks taken after k of its steps
        self._view_step = 0  # window step the cached view was computed at
        self._view: WorkerView | None = None

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    @property
    def now(self) -> float:
        return self.clock.now

    # ----- work arriving ----------------------------------------------------------
    def submit(self, tr: Tracker) -> None:
        """A request to prefill here (prefill or mixed worker)."""
        r = tr.req
        seq = Sequence(r.request_id, _prompt_tokens(r, self.spec.block_size),
                       SamplingParams(max_tokens=r.output_tokens), r.index)
        tr.seq, tr.prefill_left = seq, r.prompt_tokens
        self.trackers[r.request_id] = tr
        self.backlog += r.prompt_tokens
        self.held += 1
        self._arrive(seq, before_step_done=False)

    def reserve(self, tr: Tracker) -> None:
        """Decode worker: hold blocks for the prompt's KV before it is sent."""
        alloc = self.blocks.allocate(tr.req.request_id, [0] * tr.req.prompt_tokens,
                                     reuse_prefix=False)
        assert alloc is not None, f"{self.worker_id}: router placed {tr.req.request_id} without room"
        self.reserved += 1
        self.held += 1
        self._touch()
        if self.state is State.WINDOW:  # fewer free blocks than the window assumed
            self._cut_window(self.now, before_step_done=False)

    def land(self, tr: Tracker) -> None:
        """Decode worker: the KV arrived; the request decodes from its next token."""
        r = tr.req
        seq = Sequence(r.request_id, _prompt_tokens(r, self.spec.block_size),
                       SamplingParams(max_tokens=r.output_tokens), r.index, output_token_ids=[0])
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = SequenceStatus.RUNNING
        tr.seq, tr.prefill_left = seq, 0
        self.trackers[r.request_id] = tr
        self.reserved -= 1
        self._arrive(seq, before_step_done=True)

    def release(self, tr: Tracker) -> None:
        """Prefill worker: the KV has left; free its blocks."""
        self.blocks.free(tr.req.request_id)
        self._touch()
        if self.state is State.IDLE and (self.waiting or self.inbox):
            self._schedule_wake(self.now)

    def _arrive(self, seq: Sequence, before_step_done: bool) -> None:
        """``before_step_done``: the caller's event sorts before STEP_DONE at equal
        times (a KV landing), so a step ending right now still picks it up."""
        self.inbox.append(seq)
        self._touch()
        if self.state is State.IDLE:
            self._schedule_wake(self.now)
        elif self.state is State.WINDOW:
            self._cut_window(self.now, before_step_done)

    def _schedule_wake(self, now: float) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self.events.push(now, EventKind.WAKE, self._on_wake)

    def _touch(self) -> None:
        self._view = None

    # ----- the load a policy sees ------------------------------------------------------
    def view(self) -> WorkerView:
        """The worker's load now. Inside a decode window the planner would already
        have grown the sequences' blocks for the step in progress: counted here."""
        step = self._window_step(self.now) if self.state is State.WINDOW else 0
        if self._view is None or step != self._view_step:
            s, b = self.spec, self.spec.batch
            free = self.blocks.num_free_blocks - (self._window_needs[step] if step else 0)
            self._view = WorkerView(s.worker_id, s.role, s.gpu_type, self.backlog, self.held,
                                    free, self.blocks.num_blocks, s.block_size,
                                    b.max_num_batched_tokens, b.max_num_seqs)
            self._view_step = step
        return self._view

    def _window_step(self, now: float, before_step_done: bool = False) -> int:
        """The window's step in progress at ``now`` (1-based), as the planner
        would see it: events sorting before STEP_DONE see a step ending now as
        not yet ended."""
        find = bisect.bisect_left if before_step_done else bisect.bisect_right
        return min(find(self._window, now) + 1, len(self._window))

    # ----- stepping -----------------------------------------------------------------------
    def _on_wake(self, _=None) -> None:
        self._wake_pending = False
        if self.state is State.IDLE:
            self._flush_inbox()
            self._start_next()

    def _flush_inbox(self) -> None:
        for seq in self.inbox:
            if seq.status is SequenceStatus.RUNNING:
                self.running.append(seq)
            else:
                self.waiting.append(seq)
        self.inbox.clear()

    def _start_next(self) -> None:
        if self.fast_forward and self._start_window():
            return
        plan = self.planner.plan(self.waiting, self.running)
        self.stats.planner_calls += 1
        if plan.preempted:
            self._on_preempted(plan)
        if not plan.chunks:
            self.state = State.IDLE
            self._touch()
            return
        self._run_step(plan)

    def _run_step(self, plan: StepPlan) -> None:
        tokens = dec_ctx = rows = 0
        prefill = []
        for c in plan.chunks:
            seq, n = c.seq, c.num_tokens
            self._skip_cached(seq)
            tokens += n
            end = seq.num_computed_tokens + n
            if end == seq.num_tokens:
                rows += 1
            if seq.is_decoding:
                dec_ctx += end
            else:
                prefill.append((n, seq.num_computed_tokens))
        dt = self.latency.step_time(tokens, len(plan.chunks), rows, dec_ctx, prefill)
        self.stats.flops += self.latency.model_flops(tokens, dec_ctx, prefill)
        self._plan, self._step_start = plan, self.now
        self.state = State.STEP
        self._version += 1
        t_end = self.now + dt
        if self.spec.role == "prefill":
            self._announce_exports(plan, t_end)
        self.events.push(t_end, EventKind.STEP_DONE, self._on_step_done, self._version)

    def _skip_cached(self, seq: Sequence) -> None:
        """Prompt tokens the planner served from the prefix cache leave the backlog."""
        tr = self.trackers[seq.request_id]
        if tr.prefill_left > seq.num_uncomputed:
            self.backlog -= tr.prefill_left - seq.num_uncomputed
            tr.prefill_left = seq.num_uncomputed

    def _announce_exports(self, plan: StepPlan, t_end: float) -> None:
        for c in plan.chunks:
            if c.seq.num_computed_tokens + c.num_tokens == c.seq.num_tokens:
                self.hooks.on_plan_prefill_done(self.trackers[c.seq.request_id], self.now, t_end)

    def _on_step_done(self, version: int) -> None:
        if version != self._version:
            return  # a cut window was rescheduled
        if self.state is State.WINDOW:
            self._apply_window(len(self._window))
        else:
            self._apply_step()
        self._flush_inbox()
        self._touch()
        self.hooks.on_change()
        self._start_next()

    def _apply_step(self) -> None:
        plan, now = self._plan, self.now
        self.stats.busy_s += now - self._step_start
        self.stats.steps += 1
        for c in plan.chunks:
            seq, tr = c.seq, self.trackers[c.seq.request_id]
            if tr.prefill_left:
                done = min(c.num_tokens, tr.prefill_left)
                tr.prefill_left -= done
                self.backlog -= done
                self.stats.prefill_tokens += c.num_tokens
            else:
                self.stats.decode_tokens += c.num_tokens
            seq.num_computed_tokens += c.num_tokens
            if self.spec.enable_prefix_caching and seq.num_computed_tokens == len(seq.prompt_token_ids):
                # hashed once the whole prompt is in (the engine hashes after every step;
                # once per prompt keeps long Mooncake prompts affordable)
                self.blocks.commit_full_blocks(seq.request_id, seq.prompt_token_ids)
            if seq.num_computed_tokens == seq.num_tokens:
                self._sample(seq, tr, now)
        self._plan = None

    def _sample(self, seq: Sequence, tr: Tracker, now: float) -> None:
        seq.output_token_ids.append(0)
        tr.record_token(now)
        if self.spec.role == "prefill":
            self.running.remove(seq)  # blocks stay until the KV has left (release)
            self.trackers.pop(seq.request_id)
            self.held -= 1
            tr.seq = None
            self.hooks.on_first_token(tr, now)
        elif len(seq.output_token_ids) >= tr.req.output_tokens:
            self._finish(seq, tr, now)

    def _finish(self, seq: Sequence, tr: Tracker, now: float) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        del self.trackers[seq.request_id]
        self.held -= 1
        tr.seq = None
        tr.finish_s = now
        self.hooks.on_finish(tr, now)

    def _on_preempted(self, plan: StepPlan) -> None:
        for seq in plan.preempted:
            tr = self.trackers[seq.request_id]
            tr.preemptions += 1
            self.stats.preemptions += 1
            self.backlog += seq.num_tokens - tr.prefill_left
            tr.prefill_left = seq.num_tokens

    # ----- fast-forwarded decode windows ---------------------------------------------------------
    def _start_window(self) -> bool:
        running, bs = self.running, self.spec.block_size
        if self.waiting or not running or len(running) > self.spec.batch.max_num_batched_tokens:
            return False
        trackers = self.trackers
        left = min(trackers[s.request_id].req.output_tokens - len(s.output_token_ids)
                   for s in running)
        if left < 2 or any(s.num_uncomputed != 1 or trackers[s.request_id].prefill_left
                           for s in running):
            return False  # someone is (re-)prefilling: the planner decides
        needs = self._block_needs(left, bs)
        steps = bisect.bisect_right(needs, self.blocks.num_free_blocks) - 1
        if steps < 2:
            return False
        n = len(running)
        ctx = sum(s.num_tokens for s in running)
        t, ends = self.now, []
        for j in range(steps):
            t += self.latency.step_time(n, n, n, ctx + j * n, ())
            ends.append(t)
        self._window, self._window_start, self._window_ctx = ends, self.now, ctx
        self._window_needs = needs
        self.state = State.WINDOW
        self._version += 1
        self.events.push(ends[-1], EventKind.STEP_DONE, self._on_step_done, self._version)
        return True

    def _block_needs(self, limit: int, bs: int) -> list[int]:
        """``needs[k]``: new KV blocks the running sequences take over k more decode
        steps (k <= limit); a sequence with c computed tokens in b blocks takes one
        at step b*bs - c + 1, then every ``bs`` steps."""
        diff = [0] * (limit + 1)
        for s in self.running:
            j = len(self.blocks.block_table(s.request_id)) * bs - s.num_computed_tokens + 1
            while j <= limit:
                diff[j] += 1
                j += bs
        return list(itertools.accumulate(diff))

    def _cut_window(self, now: float, before_step_done: bool) -> None:
        """New work: stop the window at the end of the step running at ``now``
        (as the planner would see it at that step boundary)."""
        k = self._window_step(now, before_step_done)
        if k >= len(self._window):
            return
        del self._window[k:]
        self._version += 1
        self.events.push(self._window[-1], EventKind.STEP_DONE, self._on_step_done, self._version)

    def _apply_window(self, k: int) -> None:
        ends, n = self._window, len(self.running)
        self.stats.busy_s += ends[k - 1] - self._window_start
        self.stats.steps += k
        self.stats.windows += 1
        self.stats.decode_tokens += k * n
        self.stats.flops += self.latency.model_flops(k * n, k * self._window_ctx + n * k * (k - 1) // 2)
        worst = max((ends[j] - ends[j - 1] for j in range(1, k)), default=0.0)
        first, last, bs, blocks = ends[0], ends[k - 1], self.spec.block_size, self.blocks
        finished, pad = [], [0] * k
        for seq in self.running:
            rid = seq.request_id
            tr = self.trackers[rid]
            tokens = seq.num_computed_tokens + k
            if len(blocks.block_table(rid)) * bs < tokens:  # the planner would have appended
                assert blocks.append(rid, tokens)
            seq.num_computed_tokens = tokens
            seq.output_token_ids += pad
            gap = first - tr.last_token_s
            tr.max_gap_s = max(tr.max_gap_s, gap, worst)
            tr.last_token_s = last
            if len(seq.output_token_ids) >= tr.req.output_tokens:
                finished.append((seq, tr))
        for seq, tr in finished:
            self._finish(seq, tr, ends[k - 1])
        self._window = []
        self._window_needs = []


def _prompt_tokens(r, block_size: int) -> list[int]:
    """Dummy prompt ids; with Mooncake hash ids, each 512-token block is filled
    with its id so equal ids give equal KV-block hashes (prefix reuse)."""
    if not r.hash_ids:
        return [0] * r.prompt_tokens
    from sim.workload import MOONCAKE_BLOCK_TOKENS
    ids: list[int] = []
    for h in r.hash_ids:
        ids.extend([h + 1] * MOONCAKE_BLOCK_TOKENS)
    ids.extend([0] * (r.prompt_tokens - len(ids)))
    return ids[:r.prompt_tokens]

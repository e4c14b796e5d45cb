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

Fast-forward (``fast_forward=True``, decode and mixed workers, no prefix
caching): once every running sequence is decoding, the planner's next steps
are known — one token for each, while the KV cache has room — so the running
sequences become a ``DecodeBatch`` (sim.decode_batch) of aggregates:

    nothing waiting -> one ``DecodeWindow`` of steps up to the first finish
                       (or the last step whose KV blocks fit), timed in closed
                       form; new work, or requests left waiting at the
                       controller, cut it at the step in progress
    prompts waiting -> one step: the planner admits them
                       (``BatchPlanner.plan_admissions``) beside the batch's
                       decodes; finished prompts join the batch
    anything else   -> (KV short, a prompt still prefilling) the members are
                       written back and ``plan`` runs every step until all
                       running sequences decode again

Members' KV growth is held as one pooled block table (blocks are
interchangeable without prefix caching, which is why it is off there), so
the block manager's free count, and every decision, is the planner's at each
step. Times agree with stepping one by one up to float rounding
(``tests/sim/test_fast_forward.py``).

The load a policy sees (``view``): the view last computed holds until the
worker's state changes, or inside a window until a step takes new KV blocks
(``DecodeWindow.advance``); a view nobody else holds any more is refreshed in
place (``tests/sim/test_views.py``: a policy that keeps views sees snapshots).
"""

from __future__ import annotations

import functools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from sys import getrefcount

from cluster.policies import WorkerView
from sim.decode_batch import DecodeBatch, DecodeWindow, Member
from sim.events import STEP_DONE, WAKE, Clock, EventQueue
from sim.latency import LatencyModel
from sim.tracker import Tracker
from workers.batch_planner import BatchConfig, BatchPlanner, StepPlan
from workers.block_manager import BlockManager
from workers.sampling import SamplingParams
from workers.sequence import Sequence, SequenceStatus

_INF = float("inf")


class _RefProbe:
    """``SimWorker.view``'s way of holding its cached view, to count references."""

    def __init__(self) -> None:
        self.cached_view = object()

    def count(self) -> int:
        v = self.cached_view
        return getrefcount(v)


# ``getrefcount`` of a cached view only its worker holds (on CPython 3.11: the
# attribute, the local name, the call's argument; measured, not assumed)
_UNSHARED = _RefProbe().count()


class State(Enum):
    IDLE = "idle"
    STEP = "step"  # one planned step in flight
    WINDOW = "window"  # a fast-forwarded run of decode steps in flight


IDLE, STEP, WINDOW = State.IDLE, State.STEP, State.WINDOW  # an Enum member lookup costs ~70 ns
_RUNNING = SequenceStatus.RUNNING


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
    prefill_step_noise: tuple[float, ...] = ()  # prefill worker: a step lasts the model's time
    #   times one of these, drawn per step (measured on a shared machine; empty: exactly)
    seed: int = 0  # of that draw


@dataclass
class WorkerStats:
    busy_s: float = 0.0  # time spent stepping
    steps: int = 0  # engine steps (a window counts each of its steps)
    planner_calls: int = 0  # BatchPlanner.plan / plan_admissions calls
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
    waiting: list  # the controller's waiting requests (its list itself): while any wait,
    #                it runs a round at every step boundary, so no window spans two


class SimWorker:
    def __init__(self, spec: WorkerSpec, latency: LatencyModel, events: EventQueue,
                 clock: Clock, hooks: Hooks, fast_forward: bool = True):
        self.spec = spec
        self.clock = clock
        self.latency = latency
        self.events = events
        self.hooks = hooks
        self.fast_forward = (fast_forward and spec.role != "prefill"
                             and not spec.enable_prefix_caching)
        self._max_tokens = spec.batch.max_num_batched_tokens  # tokens per step
        self._step_done = self._on_step_done  # the bound method, made once (an event each)
        self._decode_lines: dict[int, tuple[float, float]] = {}  # batch size -> decode_line
        self.blocks = BlockManager(spec.num_kv_blocks, spec.block_size, spec.enable_prefix_caching)
        self._noise = random.Random(spec.seed) if spec.prefill_step_noise else None
        self.planner = BatchPlanner(spec.batch, self.blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.inbox: list[Sequence] = []  # landed / submitted during a step
        self.trackers: dict[str, Tracker] = {}
        self.held = 0  # requests assigned and not yet finished or handed off
        self.reserved = 0  # decode: KV reservations whose transfer is in flight
        self.backlog = 0  # prompt tokens still to prefill here
        self.state = IDLE
        self.stats = WorkerStats()
        self.batch = DecodeBatch(spec.block_size)  # running sequences kept as aggregates
        self.steps_done = 0
        self._newcomers: list[Sequence] = []  # running, not yet in the batch
        self._pool_id = f"{spec.worker_id}/decode-growth"  # the members' pooled KV growth
        self._pooled = 0  # blocks in that table
        self._version = 0
        self._wake_pending = False
        self._plan: StepPlan | None = None
        self._step_start = 0.0
        self._window: DecodeWindow | None = None
        # the view last computed, valid while now < view_until (the controller reads
        # both, to skip the call for a view that holds)
        b = spec.batch
        self.cached_view = WorkerView(spec.worker_id, spec.role, spec.gpu_type, 0, 0,
                                      spec.num_kv_blocks, spec.num_kv_blocks, spec.block_size,
                                      b.max_num_batched_tokens, b.max_num_seqs)
        self.view_until = -_INF

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
                       _params(r.output_tokens), r.index)
        if self.spec.role == "mixed":  # it decodes here too: its rank counts (a prefill
            seq.priority, seq.boost_steps = tr.priority, tr.boost_steps  # worker ranks none)
        tr.seq, tr.prefill_left = seq, r.prompt_tokens
        self.trackers[r.request_id] = tr
        self.backlog += r.prompt_tokens
        self.held += 1
        self._arrive(seq, before_step_done=False)

    def reserve(self, tr: Tracker) -> None:
        """Decode worker: hold blocks for the prompt's KV before it is sent."""
        if self.batch:  # the block manager's free count must be exact
            self._pool_blocks(self.batch.growth(self._step_in_progress()))
        ok = self.blocks.allocate_fresh(tr.req.request_id, tr.req.prompt_tokens)
        assert ok, f"{self.worker_id}: router placed {tr.req.request_id} without room"
        self.reserved += 1
        self.held += 1
        self._touch()
        if self.state is WINDOW:  # fewer free blocks than the window assumed
            w = self._window
            last = self.batch.last_fitting_step(self._step_in_progress(), w.last,
                                                self.blocks.num_free_blocks + self._pooled)
            self._end_window_at(last)

    def land(self, tr: Tracker) -> None:
        """Decode worker: the KV arrived; the request decodes from its next token."""
        r = tr.req
        seq = Sequence(r.request_id, _prompt_tokens(r, self.spec.block_size),
                       _params(r.output_tokens), r.index, output_token_ids=[0],
                       priority=tr.priority, boost_steps=tr.boost_steps)
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = SequenceStatus.RUNNING
        tr.seq, tr.prefill_left = seq, 0
        self.trackers[r.request_id] = tr
        self.reserved -= 1
        self._arrive(seq, before_step_done=True)

    def release_reservation(self, tr: Tracker) -> None:
        """Decode worker: a reserved request that will not decode (one token)."""
        self.blocks.free(tr.req.request_id)
        self.reserved -= 1
        self.held -= 1
        self._touch()

    def release(self, tr: Tracker) -> None:
        """Prefill worker: the KV has left; free its blocks."""
        self.blocks.free(tr.req.request_id)
        self._touch()
        if self.state is IDLE and (self.waiting or self.inbox):
            self._schedule_wake(self.clock.now)

    def hold(self) -> None:
        """Requests wait at the controller: end any window at the step in progress."""
        if self.state is WINDOW:
            self._end_window_at(self._window.step_at(self.clock.now))

    def _arrive(self, seq: Sequence, before_step_done: bool) -> None:
        """``before_step_done``: the caller's event sorts before STEP_DONE at equal
        times (a KV landing), so a step ending right now still picks it up."""
        self.inbox.append(seq)
        self.view_until = -_INF  # _touch
        if self.state is IDLE:
            self._schedule_wake(self.clock.now)
        elif self.state is WINDOW:
            self._end_window_at(self._window.step_at(self.clock.now, before_step_done))

    def _schedule_wake(self, now: float) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self.events.push(now, WAKE, self._on_wake)

    def _touch(self) -> None:
        self.view_until = -_INF  # recompute (the old view is reused if equal)

    # ----- the load a policy sees ------------------------------------------------------
    def view(self) -> WorkerView:
        """The worker's load now. Inside a decode window the planner would already
        have grown the sequences' blocks for the step in progress: counted here."""
        if self.clock.now < self.view_until:
            return self.cached_view
        return self.refresh_view()

    def refresh_view(self) -> WorkerView:
        """``view`` once ``cached_view`` no longer holds (``now >= view_until``)."""
        now = self.clock.now
        free, w = self.blocks.num_free_blocks, self._window
        if w is not None:  # it holds while the members' growth does
            self.view_until, grown = w.advance(now)
            free += self._pooled - grown
        else:
            self.view_until = _INF
            if self.batch.members:
                free += self._pooled - self.batch.growth(self._step_in_progress())
        v = self.cached_view
        if getrefcount(v) == _UNSHARED:
            # Only this worker holds its last view: the policies that read it
            # returned long ago and kept no reference (they are pure), so no one
            # can tell the load written into it from a new snapshot (``with_load``),
            # which costs five times as much.
            fields = v.__dict__
            fields["queued_prefill_tokens"] = self.backlog
            fields["running"] = self.held
            fields["free_kv_blocks"] = free
        elif v.free_kv_blocks != free or v.queued_prefill_tokens != self.backlog \
                or v.running != self.held:
            v = self.cached_view = v.with_load(self.backlog, self.held, free)
        return v

    def _step_in_progress(self) -> int:
        if self.state is WINDOW:
            return self._window.step_at(self.clock.now)
        return self.steps_done + (self.state is STEP)

    # ----- stepping -----------------------------------------------------------------------
    def _on_wake(self, _=None) -> None:
        self._wake_pending = False
        if self.state is IDLE:
            self._flush_inbox()
            self._start_next()

    def _flush_inbox(self) -> None:
        for seq in self.inbox:
            if seq.status is _RUNNING:
                self.running.append(seq)
                self._newcomers.append(seq)
            else:
                self.waiting.append(seq)
        self.inbox.clear()

    def _start_next(self) -> None:
        b, running = self.batch, self.running
        newcomers = self._newcomers if b.members else running
        if self._newcomers:
            self._newcomers = []
        if self.fast_forward and running and len(running) <= self._max_tokens \
                and (not newcomers or self._decoding(newcomers)):
            trackers, k, table = self.trackers, self.steps_done, self.blocks.block_table
            for seq in newcomers:
                rid = seq.request_id
                b.join(seq, trackers[rid], k, len(table(rid)))
            if self._start_batch_step():
                return
        self._leave_batch()
        self._planner_step()

    def _decoding(self, seqs: list[Sequence]) -> bool:
        """Whether the planner's next step for ``seqs`` is one decode token each
        (given that the token budget holds one for every running sequence)."""
        trackers = self.trackers
        for s in seqs:
            computed = s.num_computed_tokens
            if not (s.num_tokens - computed == 1 and computed > 0 and s.boost_steps <= 0
                    and not trackers[s.request_id].prefill_left):
                return False
        return True

    def _start_batch_step(self) -> bool:
        """The batch's next step(s); False if the planner must decide (KV short)."""
        if self.waiting:
            return self._admission_step()
        b, first = self.batch, self.steps_done + 1
        last, grown, kv = b.window_start(first)
        if self.hooks.waiting:
            last = first
        n, room = len(b.members), self.blocks.num_free_blocks + self._pooled
        # a member takes a block per block_size steps: check the exact growth only
        # when that bound does not fit
        if grown + n * ((last - first) // self.spec.block_size + 1) > room \
                and b.growth(last) > room:
            last = b.last_fitting_step(first, last, room)
            if last < first:
                return False
        line = self._decode_lines.get(n)  # (LatencyModel.decode_line, cached here too)
        fixed_s, per_token_s = line or self._decode_line(n)
        w = self._window = DecodeWindow(self.clock.now, first, last, fixed_s + per_token_s * kv,
                                        per_token_s * n, grown, b.phase)
        if b.joined:
            self._first_gaps(w.end(first))
        self.state = WINDOW
        self._version = version = self._version + 1
        self.view_until = -_INF  # _touch
        self.events.push(w.end(last), STEP_DONE, self._step_done, version)
        return True

    def _decode_line(self, n: int) -> tuple[float, float]:
        line = self._decode_lines[n] = self.latency.decode_line(n)
        return line

    def _admission_step(self) -> bool:
        """One step: the batch decodes, the planner admits waiting prompts beside it."""
        b, step, n = self.batch, self.steps_done + 1, len(self.batch.members)
        grown = b.growth(step)
        if grown > self.blocks.num_free_blocks + self._pooled:
            return False
        self._pool_blocks(grown)
        plan = self.planner.plan_admissions(self.waiting, self.running, self._max_tokens - n)
        self.stats.planner_calls += 1
        tokens, rows, prefill = n, n, []
        for c in plan.chunks:
            seq, k = c.seq, c.num_tokens
            tokens += k
            computed = seq.num_computed_tokens
            rows += computed + k == seq.num_tokens
            prefill.append((k, computed))
        kv = b.kv_tokens(step)
        dt = self.latency.step_time(tokens, n + len(plan.chunks), rows, kv, prefill)
        self.stats.flops += self.latency.model_flops(tokens, kv, prefill)
        if b.joined:
            self._first_gaps(self.clock.now + dt)
        self._begin_step(plan, dt)
        return True

    def _planner_step(self) -> None:
        plan = self.planner.plan(self.waiting, self.running)
        self.stats.planner_calls += 1
        if plan.preempted:
            self._on_preempted(plan)
        if not plan.chunks:
            self.state = IDLE
            self._touch()
            return
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
        if self._noise is not None and self.spec.role == "prefill":
            dt *= self._noise.choice(self.spec.prefill_step_noise)
        self.stats.flops += self.latency.model_flops(tokens, dec_ctx, prefill)
        if self.spec.role == "prefill":
            self._announce_exports(plan, self.clock.now + dt)
        self._begin_step(plan, dt)

    def _begin_step(self, plan: StepPlan, dt: float) -> None:
        now = self.clock.now
        self._plan, self._step_start = plan, now
        self.state = STEP
        self._version += 1
        self.view_until = -_INF  # _touch
        self.events.push(now + dt, STEP_DONE, self._step_done, self._version)

    def _skip_cached(self, seq: Sequence) -> None:
        """Prompt tokens the planner served from the prefix cache leave the backlog."""
        tr = self.trackers[seq.request_id]
        if tr.prefill_left > seq.num_uncomputed:
            self.backlog -= tr.prefill_left - seq.num_uncomputed
            tr.prefill_left = seq.num_uncomputed

    def _announce_exports(self, plan: StepPlan, t_end: float) -> None:
        for c in plan.chunks:
            if c.seq.num_computed_tokens + c.num_tokens == c.seq.num_tokens:
                self.hooks.on_plan_prefill_done(self.trackers[c.seq.request_id], self.clock.now, t_end)

    def _on_step_done(self, version: int) -> None:
        if version != self._version:
            return  # a cut window was rescheduled
        if self.state is WINDOW:
            self._apply_window()
        else:
            self._apply_step()
        if self.inbox:
            self._flush_inbox()
        self.view_until = -_INF  # _touch
        if self.hooks.waiting:  # (the controller has nothing to dispatch otherwise)
            self.hooks.on_change()
        self._start_next()

    def _apply_step(self) -> None:
        plan, now, st, b = self._plan, self.clock.now, self.stats, self.batch
        self.steps_done += 1
        st.busy_s += now - self._step_start
        st.steps += 1
        if b.members:  # an admission step: the batch decoded beside the plan's prompts
            st.decode_tokens += len(b.members)
            b.record_steps(self.steps_done, now - self._step_start)
            finished = b.pop_finished(self.steps_done)
            if finished:
                self._finish_members(finished)
        trackers, caching = self.trackers, self.spec.enable_prefix_caching
        for c in plan.chunks:
            seq, k = c.seq, c.num_tokens
            tr = trackers[seq.request_id]
            if tr.prefill_left:
                done = min(k, tr.prefill_left)
                tr.prefill_left -= done
                self.backlog -= done
                st.prefill_tokens += k
            else:
                st.decode_tokens += k
            seq.num_computed_tokens += k
            if caching and seq.num_computed_tokens == len(seq.prompt_token_ids):
                # hashed once the whole prompt is in (the engine hashes after every step;
                # once per prompt keeps long Mooncake prompts affordable)
                self.blocks.commit_full_blocks(seq.request_id, seq.prompt_token_ids)
            if seq.num_computed_tokens == seq.num_tokens:
                self._sample(seq, tr, now)
        if b.members:  # admitted prompts still here join the batch if they decode now
            self._newcomers += [c.seq for c in plan.chunks if c.seq.request_id in trackers]
        self._plan = None

    def _sample(self, seq: Sequence, tr: Tracker, now: float) -> None:
        seq.output_token_ids.append(0)
        if tr.first_token_s is None:
            tr.first_token_s = now
        else:
            gap = now - tr.last_token_s
            if gap > tr.max_gap_s:
                tr.max_gap_s = gap
        tr.last_token_s = now
        if self.spec.role == "prefill":
            self._remove_running(seq)  # blocks stay until the KV has left (release)
            self.trackers.pop(seq.request_id)
            self.held -= 1
            tr.seq = None
            self.hooks.on_first_token(tr, now)
        elif len(seq.output_token_ids) >= tr.req.output_tokens:
            self._finish(seq, tr, now)

    def _finish(self, seq: Sequence, tr: Tracker, now: float) -> None:
        self._remove_running(seq)
        self.blocks.free(seq.request_id)
        del self.trackers[seq.request_id]
        self.held -= 1
        tr.seq = None
        tr.finish_s = now
        self.hooks.on_finish(tr, now)

    def _remove_running(self, seq: Sequence) -> None:
        # by identity: Sequence's dataclass __eq__ compares every field
        ids = list(map(id, self.running))
        if id(seq) in ids:
            del self.running[ids.index(id(seq))]

    def _on_preempted(self, plan: StepPlan) -> None:
        for seq in plan.preempted:
            tr = self.trackers[seq.request_id]
            tr.preemptions += 1
            self.stats.preemptions += 1
            self.backlog += seq.num_tokens - tr.prefill_left
            tr.prefill_left = seq.num_tokens

    # ----- the decode batch -----------------------------------------------------------------
    def _apply_window(self) -> None:
        w, b, st = self._window, self.batch, self.stats
        first, last = w.first, w.last
        steps, n = last - first + 1, len(b.members)
        self.steps_done = last
        st.busy_s += self.clock.now - w.start_s  # now = w.end(last): this event's time
        st.steps += steps
        st.windows += 1
        st.decode_tokens += steps * n
        # (b.kv_tokens_over(first, last), written out)
        st.flops += self.latency.decode_flops(steps * n,
                                              steps * b.y_sum + n * (first + last) * steps // 2)
        b.record_steps(last, w.first_s + w.growth_s * (last - first))  # w.duration(last)
        self._window = None
        finished = b.pop_finished(last)
        if finished:
            self._finish_members(finished)

    def _end_window_at(self, last: int) -> None:
        """Stop the window after step ``last`` (new work, or fewer free blocks)."""
        w = self._window
        if last >= w.last:
            return
        w.last = last
        self.view_until = -_INF  # _touch: the view may have held past the new end
        self._version += 1
        self.events.push(w.end(last), STEP_DONE, self._step_done, self._version)

    def _first_gaps(self, first_end_s: float) -> None:
        """Members joined at this boundary sample their next token at ``first_end_s``."""
        joined = self.batch.joined
        for m in joined:
            tr = m.tracker
            gap = first_end_s - tr.last_token_s
            if gap > tr.max_gap_s:
                tr.max_gap_s = gap
        joined.clear()

    def _finish_members(self, finished: list[Member]) -> None:
        """Members whose last token was sampled in the step just done."""
        b, now = self.batch, self.clock.now
        for m in finished:
            seq, tr = m.seq, m.tracker
            gap = b.longest_step_since(m.gaps_from)
            if gap > tr.max_gap_s:
                tr.max_gap_s = gap
            tr.last_token_s = tr.finish_s = now
            self.blocks.free(seq.request_id)
            del self.trackers[seq.request_id]
            self.held -= 1
            tr.seq = None
        running = self.running
        if len(finished) == 1:  # by identity (Sequence's __eq__ compares every field)
            del running[list(map(id, running)).index(id(finished[0].seq))]
        else:
            gone = {id(m.seq) for m in finished}
            running[:] = [s for s in running if id(s) not in gone]
        for m in finished:
            self.hooks.on_finish(m.tracker, now)

    def _leave_batch(self) -> None:
        """Write every member's progress back; the planner takes over."""
        self._pool_blocks(0)
        if not self.batch:
            return
        k, members = self.steps_done, self.batch.members
        for seq in self.running:
            m = members.get(seq.request_id)
            if m is not None:
                self._write_back(m, k)
        self.batch.clear()

    def _write_back(self, m: Member, k: int) -> None:
        seq, tr = m.seq, m.tracker
        seq.num_computed_tokens = m.computed(k)
        seq.output_token_ids += [0] * (m.output_tokens(k) - len(seq.output_token_ids))
        assert self.blocks.append(seq.request_id, seq.num_computed_tokens)
        if k > m.joined_at:
            tr.max_gap_s = max(tr.max_gap_s, self.batch.longest_step_since(m.gaps_from))
            tr.last_token_s = self.clock.now

    def _pool_blocks(self, blocks: int) -> None:
        """Make the pooled table (the members' KV growth since they joined) hold
        ``blocks`` blocks."""
        if blocks == self._pooled:
            return
        bs = self.spec.block_size
        if not self.blocks.has(self._pool_id):
            assert self.blocks.allocate_fresh(self._pool_id, blocks * bs)
        elif blocks > self._pooled:
            assert self.blocks.append(self._pool_id, blocks * bs)
        else:
            self.blocks.truncate(self._pool_id, blocks * bs)
        self._pooled = blocks


@functools.cache
def _params(max_tokens: int) -> SamplingParams:
    """Frozen, so one per output length serves every sequence of that length."""
    return SamplingParams(max_tokens=max_tokens)


_ZEROS: dict[int, list[int]] = {}  # prompt length -> its shared dummy ids
_ZEROS_MAX_IDS = 1 << 22  # what they may hold in all (32 MiB)
_zeros_held = 0


def _prompt_tokens(r, block_size: int) -> list[int]:
    """Dummy prompt ids; with Mooncake hash ids, each 512-token block is filled
    with its id so equal ids give equal KV-block hashes (prefix reuse).

    Without hash ids, prompts of one length share one list of zeros (nothing
    writes a sequence's prompt ids; a million 9 KB lists cost a few percent of
    a run), as long as the lists held stay under ``_ZEROS_MAX_IDS`` ids."""
    if not r.hash_ids:
        ids = _ZEROS.get(r.prompt_tokens)
        if ids is None:
            ids = [0] * r.prompt_tokens
            _share_zeros(ids)
        return ids
    from sim.workload import MOONCAKE_BLOCK_TOKENS
    ids: list[int] = []
    for h in r.hash_ids:
        ids.extend([h + 1] * MOONCAKE_BLOCK_TOKENS)
    ids.extend([0] * (r.prompt_tokens - len(ids)))
    return ids[:r.prompt_tokens]


def _share_zeros(ids: list[int]) -> None:
    global _zeros_held
    if _zeros_held + len(ids) <= _ZEROS_MAX_IDS:
        _ZEROS[len(ids)] = ids
        _zeros_held += len(ids)


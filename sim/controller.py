"""The simulated controller: the cluster's own policies on simulated state.

Lifecycle of a request at the controller::

    arrive   -> too long for every worker? rejected ("too long")
             -> admission policy (``BoundedQueue.admit``) -> rejected ("overloaded")
             -> waiting (a ``RequestView`` per request)
    round    (on arrivals and whenever a worker's load changes: a DISPATCH
             event, which sorts after the instant's landings, finished steps
             and arrivals; an arrival with none of those left runs it at once)
             -> the order ``scheduler.order(SchedulingRound)`` gives, from the
                waiting queue (sim.waiting: kept sorted between rounds for the
                built-in schedulers; a lone request needs no ordering)
             -> for each request in that order: ``router.route(request,
                prefill views, decode views, prefix hits)``; dispatch while
                it finds room, stop at the first ``None`` or at the first
                request held for its score (``scheduler.hold_until``, only
                when scores come later: then a round when the hold ends); the rest get
                ``waited_rounds + 1``, and workers stop fast-forwarding (the
                next round comes at the next step boundary of any worker)
    dispatch -> colocated: the mixed worker queues the prompt;
                disaggregated: the decode worker reserves KV blocks, the
                prefill worker queues the prompt (after the control plane's
                ``dispatch_s``, sim.control)

The policy objects come from ``cluster.policies`` by name: this module only
builds their snapshots and carries out their decisions. Worker views are
each worker's cached ``SimWorker.view()``, refreshed only when its load may
have changed (inside a decode window: once the members' KV takes new blocks).
"""

from __future__ import annotations

from collections.abc import Callable

from cluster.policies import AdmissionPolicy, RequestView, RouterPolicy, SchedulerPolicy
from sim.events import DISPATCH, LANDED, Clock, EventQueue
from sim.tracker import Tracker
from sim.waiting import make_queue
from sim.workers import SimWorker
from workers.block_manager import block_hashes


class SimController:
    def __init__(self, scheduler: SchedulerPolicy, router: RouterPolicy,
                 admission: AdmissionPolicy, prefill: list[SimWorker], decode: list[SimWorker],
                 events: EventQueue, clock: Clock, on_reject: Callable[[Tracker], None],
                 use_prefix_index: bool = False, max_model_len: int = 1 << 62,
                 dispatch_s: float = 0.0, scores_later: bool = False):
        self.scheduler, self.router, self.admission = scheduler, router, admission
        self.prefill, self.decode = prefill, decode
        self.colocated = prefill is decode
        self.events, self.clock, self.on_reject = events, clock, on_reject
        self.queue = make_queue(scheduler)  # the waiting requests in the scheduler's order
        self.waiting = self.queue.views  # one list, changed in place (the workers read it)
        self.trackers: dict[str, Tracker] = {}
        self.rounds = 0
        self.dispatch_order: list[str] = []  # request ids in dispatch order
        self._round_pending = False
        self.use_prefix_index = use_prefix_index
        self.max_model_len = max_model_len  # longer requests are refused, as the engine does
        self.prefix_index: dict[str, set[int]] = {w.worker_id: set() for w in prefill}
        self._index_log: list[str] = []  # the prefill worker of each update of prefix_index
        self._hits_of: dict[str, tuple[int, dict[str, int]]] = {}  # waiting request id ->
        #   (len(_index_log), its prefix hits) as last computed
        self._max_prompt_blocks = max(w.blocks.num_blocks for w in prefill)
        self._max_total_blocks = max(w.blocks.num_blocks for w in decode)
        self._block_size = prefill[0].spec.block_size
        # no request of at most this many tokens is too long (``_too_long``)
        self._max_fit_tokens = min(self.max_model_len,
                                   self._max_prompt_blocks * self._block_size,
                                   self._max_total_blocks * self._block_size)
        self._by_id = {w.worker_id: w for w in [*prefill, *decode]}
        self.dispatch_s = dispatch_s  # the control plane's delay before the prompt reaches P
        self.scores_later = scores_later  # a request joins unscored; ``rescore`` brings its score
        self._next_hold_round = float("inf")  # when a round for a request held for its score is due

    # ----- arrivals ------------------------------------------------------------------
    def arrive(self, tr: Tracker) -> None:
        r = tr.req
        view = RequestView(r.request_id, r.prompt_tokens, r.output_tokens, r.arrival_s, 0,
                           None if self.scores_later else tr.score,
                           r.output_tokens,  # true_output_tokens
                           self._prefix_hashes(r) if self.use_prefix_index else ())
        total = r.prompt_tokens + r.output_tokens
        reason = self._too_long(r) if total > self._max_fit_tokens else ""
        if not reason:
            decision = self.admission.admit(len(self.waiting), view)
            reason = "" if decision.accepted else decision.reason
        if reason:
            tr.rejected = reason
            self.on_reject(tr)
            return
        self.trackers[r.request_id] = tr
        self.waiting.append(view)  # (the queue takes it in at its next call)
        # the round: at once when no event sorts before a DISPATCH pushed now, as that
        # event would run it next (one event fewer per request)
        heap = self.events.heap
        if self._round_pending or (heap and heap[0][0] == self.clock.now
                                   and heap[0][1] < DISPATCH):
            self.request_round()
        else:
            self._round()

    def _too_long(self, r) -> str:
        if r.prompt_tokens + r.output_tokens > self.max_model_len:
            return (f"too long: {r.prompt_tokens} + {r.output_tokens} tokens exceed the model's "
                    f"context of {self.max_model_len}")
        bs = self._block_size
        if -(-(r.prompt_tokens + r.output_tokens) // bs) > self._max_total_blocks or \
                -(-r.prompt_tokens // bs) > self._max_prompt_blocks:
            return (f"too long: {r.prompt_tokens} + {r.output_tokens} tokens exceed every "
                    "worker's KV cache")
        return ""

    def _prefix_hashes(self, r) -> tuple[int, ...]:
        if not (self.use_prefix_index and r.hash_ids):
            return ()
        from sim.workers import _prompt_tokens
        return tuple(block_hashes(_prompt_tokens(r, self._block_size), self._block_size))

    def rescore(self, scored: list[Tracker]) -> None:
        """Scores came back (``sim.ranker``): those of requests still waiting
        take effect, as in the controller; a request dispatched unscored keeps
        its place."""
        now, changed = self.clock.now, False
        for tr in scored:
            if tr.req.request_id in self.trackers:
                self.queue.rescore(tr.req.request_id, tr.score, now)
                changed = True
        if changed:
            self.request_round()

    # ----- rounds ----------------------------------------------------------------------
    def request_round(self) -> None:
        if self.waiting and not self._round_pending:
            self._round_pending = True
            self.events.push(self.clock.now, DISPATCH, self._round)

    def _round_at(self, t: float) -> None:
        """A round at ``t`` (a held request's end of waiting for its score),
        unless one is already due by then."""
        if t < self._next_hold_round:
            self._next_hold_round = t
            self.events.push(t, DISPATCH, self._hold_round)

    def _hold_round(self, _=None) -> None:
        self._next_hold_round = float("inf")
        self.request_round()

    def _round(self, _=None) -> None:
        self._round_pending = False
        waiting = self.waiting
        if not waiting:
            return
        self.rounds += 1
        now = self.clock.now
        if len(waiting) == 1 and self.queue.lone_in_order:
            order = waiting  # one request (never passed over): nothing to order
        else:
            order = self.queue.order(now, self.rounds)
        prefill, decode, router = self.prefill, self.decode, self.router
        hold = self.scheduler.hold_until if self.scores_later else None  # (instant scores: none)
        sent = 0
        for view in order:
            if hold is not None:
                until = hold(view, now)
                if until is not None:  # waiting for its score: a round when that ends
                    self._round_at(until)
                    break
            # ``SimWorker.view`` written out: a worker's cached view while it holds
            pviews = [w.cached_view if now < w.view_until else w.refresh_view() for w in prefill]
            dviews = pviews if self.colocated else \
                [w.cached_view if now < w.view_until else w.refresh_view() for w in decode]
            route = router.route(view, pviews, dviews,
                                 self._hits(view) if view.prefix_hashes else None)
            if route is None:
                break
            self._dispatch(view, route.prefill_worker, route.decode_worker)
            sent += 1
        if sent == len(waiting):
            if order is waiting:
                waiting.clear()
            else:
                self.queue.clear()
            return
        self.queue.settle(order, sent, now)  # the rest were passed over once more
        # a round at every step boundary from now on, as when stepping
        for w in self._by_id.values():
            w.hold()

    def _hits(self, view: RequestView) -> dict[str, int] | None:
        """Leading blocks of ``view``'s prefix each prefill worker's index holds.

        Kept per waiting request and brought up to date from the log of index
        changes: rounds that find no room ask again for the same few requests,
        often hundreds of times, and an index only grows (a count can only go
        up, so it is read on from where it was)."""
        hashes = view.prefix_hashes
        if not hashes:
            return None
        log, index = self._index_log, self.prefix_index
        known = self._hits_of.get(view.request_id)
        if known is None:
            hits = {wid: _held(hashes, held, 0) for wid, held in index.items()}
        elif known[0] == len(log):
            return known[1]
        else:
            hits = dict(known[1])  # (a new dict: a policy may keep the one it got)
            for wid in set(log[known[0]:]):
                hits[wid] = _held(hashes, index[wid], hits[wid])
        self._hits_of[view.request_id] = (len(log), hits)
        return hits

    def _dispatch(self, view: RequestView, prefill_id: str, decode_id: str) -> None:
        tr = self.trackers.pop(view.request_id)
        tr.dispatch_s = self.clock.now
        placement = self.scheduler.placement(view, tr.dispatch_s)
        tr.priority, tr.boost_steps = placement.priority, placement.boost_steps
        tr.prefill_worker, tr.decode_worker = prefill_id, decode_id
        self.dispatch_order.append(view.request_id)
        p = self._by_id.get(prefill_id) or self._worker(prefill_id)
        if not self.colocated:
            self._worker(decode_id).reserve(tr)
        if view.prefix_hashes:
            self.prefix_index[prefill_id].update(view.prefix_hashes)
            self._index_log.append(prefill_id)
            self._hits_of.pop(view.request_id, None)
        if self.dispatch_s:
            self.events.push(self.clock.now + self.dispatch_s, LANDED, p.submit, tr)
        else:
            p.submit(tr)

    def _worker(self, worker_id: str) -> SimWorker:
        if worker_id not in self._by_id:
            raise ValueError(f"router returned unknown worker {worker_id!r}")
        return self._by_id[worker_id]


def _held(hashes: tuple[int, ...], index: set[int], start: int) -> int:
    """How many leading ``hashes`` are in ``index``, the first ``start`` known to be."""
    n = start
    for h in hashes[start:]:
        if h not in index:
            break
        n += 1
    return n

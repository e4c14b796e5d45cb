"""The simulated controller's waiting requests, in the scheduler's order.

Lifecycle of a waiting request::

    views.append(view)      it joins, passed over 0 times (the queue
                            takes in new views at its next call)
    order(now, round)       at each round: every waiting request, first to
                            dispatch first, as ``scheduler.order(SchedulingRound(
                            now, round, waiting))`` orders them, each as a view
                            with its current ``waited_rounds``
    settle(order, sent, now)
                            the controller dispatched the first ``sent`` of
                            that order (not all: ``clear`` then): they leave,
                            every other one is passed over once more
    rescore(id, score, now) its ranker score came back while it waits (the
                            simulated ranker's scoring time): it moves to
                            its new place, keeping its count

Two queues, the same orders:

- ``ScannedQueue``, for any scheduler: ``scheduler.order`` over every waiting
  view at every round, and a new view (``waited_rounds + 1``) for each one
  passed over. O(waiting) per round.
- ``IndexedQueue``, for the built-in schedulers with no wall-clock bound
  (``max_wait_s``): their shared ``SchedulerPolicy.order`` puts the promoted
  requests (``starving``) first by arrival, then the rest by ``key``, and a
  request's promotion changes only with its round count, at the counts
  ``rounds_to_change`` names. So both lists stay sorted between rounds;
  ``starving`` is asked again for a request only at such a count, and a
  view with the current count is built only for the requests the router is
  shown (a round that finds no room stops at the first). An overloaded
  cluster has a thousand requests waiting and a round at every step
  boundary of every worker: scanning them all made a 3,000-request Mooncake
  replay cost some 1,000 s.

Both keep ``views``, the list the controller hands its workers (they read
only whether it is empty) and its admission policy (its length). A request
joins in ``IndexedQueue.views`` with the view it arrived with; its current
count lives in the queue.

Ties: ``scheduler.order`` sorts stably, so requests of equal keys keep the
order they joined in; the index breaks ties by that joining number.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence

from cluster.policies import RequestView, SchedulerPolicy, SchedulingRound
from cluster.policies.scheduler import FCFS, LearnedRank, SJFOracle

# schedulers whose ``order``, ``starving`` and ``key`` are the ones ``IndexedQueue``
# relies on (``key`` not reading ``waited_rounds``)
_INDEXABLE = (FCFS, SJFOracle, LearnedRank)


def make_queue(scheduler: SchedulerPolicy) -> ScannedQueue | IndexedQueue:
    if type(scheduler) in _INDEXABLE and scheduler.max_wait_s is None:
        return IndexedQueue(scheduler)
    return ScannedQueue(scheduler)


class ScannedQueue:
    """The scheduler's ``order`` over every waiting view at every round."""

    def __init__(self, scheduler: SchedulerPolicy):
        self.scheduler = scheduler
        self.views: list[RequestView] = []  # waiting, in joining order, with current counts
        # a lone waiting request is the order (the shared ``SchedulerPolicy.order``,
        # pure, puts it first): the controller then routes it without asking
        self.lone_in_order = type(scheduler).order is SchedulerPolicy.order

    def order(self, now: float, round_index: int) -> Sequence[RequestView]:
        return self.scheduler.order(SchedulingRound(now, round_index, tuple(self.views)))

    def settle(self, order: Sequence[RequestView], sent: int, now: float) -> None:
        gone = {v.request_id for v in order[:sent]}
        self.views[:] = [v.with_waited_rounds(v.waited_rounds + 1)
                         for v in self.views if v.request_id not in gone]

    def rescore(self, request_id: str, score: float | None, now: float) -> None:
        _rescore_view(self.views, 0, request_id, score)

    def clear(self) -> None:
        self.views.clear()


def _rescore_view(views: list[RequestView], start: int, request_id: str,
                  score: float | None) -> None:
    for i in range(start, len(views)):
        if views[i].request_id == request_id:
            views[i] = views[i].with_score(score)
            return


class _Waiting:
    """A request in the index."""

    __slots__ = ("view", "base", "seq", "key", "promoted", "item", "left")

    def __init__(self, view: RequestView, base: int, seq: int, key: tuple):
        self.view = view  # the latest view built for it
        self.base = base  # its count is ``IndexedQueue._passes - base``
        self.seq = seq  # joining number: ties in ``key`` keep joining order
        self.key = key  # the scheduler's key (fixed: it does not read the count)
        self.promoted = False  # ``starving`` when last asked
        self.item: tuple = ()  # its entry in that list (``_promoted`` or ``_rest``)
        self.left = False  # dispatched (its pending change is then skipped)


class IndexedQueue:
    """Promoted and other requests in two sorted lists, kept between rounds."""

    def __init__(self, scheduler: SchedulerPolicy):
        self.scheduler = scheduler
        self.views: list[RequestView] = []  # waiting, in joining order, as they joined
        self.indexed = 0  # leading ``views`` in the lists below; the rest joined since
        self.lone_in_order = True  # a lone request in ``views`` is the order: none indexed
        self._promoted: list[tuple] = []  # (arrival_s, request_id, seq, _Waiting)
        self._rest: list[tuple] = []  # (key, seq, _Waiting)
        self._changes: list[tuple] = []  # heap of (passes, seq, _Waiting): ask ``starving`` then
        self._passes = 0  # rounds so far that passed over every request still waiting
        self._seq = 0
        self._entries: dict[str, _Waiting] = {}  # indexed requests by id (for ``rescore``)

    def order(self, now: float, round_index: int) -> Iterator[RequestView]:
        self._index_new(now)
        changes, passes = self._changes, self._passes
        while changes and changes[0][0] <= passes:
            e = heapq.heappop(changes)[2]
            if not e.left:
                ranked = self._promoted if e.promoted else self._rest
                del ranked[bisect_left(ranked, e.item)]
                self._place(e, self._current(e), now)
        return self._in_order()

    def settle(self, order: Sequence[RequestView], sent: int, now: float) -> None:
        self._index_new(now)  # a lone request routed without ``order``
        if sent:
            promoted, rest = self._promoted, self._rest
            k = min(sent, len(promoted))
            gone = promoted[:k] + rest[:sent - k]
            del promoted[:k], rest[:sent - k]
            for item in gone:
                item[-1].left = True
                del self._entries[item[-1].view.request_id]
            ids = {item[-1].view.request_id for item in gone}
            self.views[:] = [v for v in self.views if v.request_id not in ids]
            self.indexed -= sent
        self.lone_in_order = False  # (requests are left, indexed)
        self._passes += 1

    def rescore(self, request_id: str, score: float | None, now: float) -> None:
        e = self._entries.get(request_id)
        if e is None:  # joined since the last round: indexed with its new view later
            _rescore_view(self.views, self.indexed, request_id, score)
            return
        ranked = self._promoted if e.promoted else self._rest
        del ranked[bisect_left(ranked, e.item)]
        e.view = self._current(e).with_score(score)
        e.key = self.scheduler.key(e.view)
        self._place(e, e.view, now)  # (its pending change, if any, then re-places it again)

    def clear(self) -> None:
        self.views.clear()
        self._entries.clear()
        self._promoted.clear()
        self._rest.clear()
        self._changes.clear()
        self.indexed = 0
        self.lone_in_order = True

    def _index_new(self, now: float) -> None:
        views, key = self.views, self.scheduler.key
        for view in views[self.indexed:]:
            e = _Waiting(view, self._passes - view.waited_rounds, self._seq, key(view))
            self._entries[view.request_id] = e
            self._seq += 1
            self._place(e, view, now)
        self.indexed = len(views)
        self.lone_in_order = not views

    def _place(self, e: _Waiting, view: RequestView, now: float) -> None:
        s = self.scheduler
        e.promoted = s.starving(view, now)
        if e.promoted:
            e.item = (view.arrival_s, view.request_id, e.seq, e)
            insort(self._promoted, e.item)
        else:
            e.item = (e.key, e.seq, e)
            insort(self._rest, e.item)
        heapq.heappush(self._changes, (self._passes + s.rounds_to_change(view.waited_rounds),
                                       e.seq, e))

    def _current(self, e: _Waiting) -> RequestView:
        n = self._passes - e.base
        if e.view.waited_rounds != n:
            e.view = e.view.with_waited_rounds(n)
        return e.view

    def _in_order(self) -> Iterator[RequestView]:
        for ranked in (self._promoted, self._rest):
            for item in ranked:
                yield self._current(item[-1])

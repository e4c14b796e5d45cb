"""The controller's ranker in the simulation: scores that take time to come back.

Lifecycle (one ``SimRanker`` per run, only when ``SimSpec.ranker_prompt_s`` > 0;
otherwise every request is scored the moment it arrives)::

    arrive(tracker)   the request joins the ranker's queue (it already waits at
                      the controller, unscored); an idle ranker starts a batch
                      once the instant's arrivals are in
    batch             at most ``max_batch`` queued requests, shortest prompt
                      first, scored in chunks of ``chunk``; a chunk of n takes
                      n x ``prompt_s`` and its scores go to the controller
                      (``SimController.rescore``) as it ends; requests queued
                      meanwhile form the next batch

This is what ``cluster/ranker/service.py`` does in the real controller, with
the encoder's measured time per prompt in place of the encoder: a request
dispatched before its score comes back is served unranked, as in the cluster.
"""

from __future__ import annotations

from collections.abc import Callable

from sim.events import DISPATCH, LANDED, Clock, EventQueue
from sim.tracker import Tracker


class SimRanker:
    def __init__(self, events: EventQueue, clock: Clock, deliver: Callable[[list[Tracker]], None],
                 prompt_s: float, chunk: int = 16, max_batch: int = 64):
        if prompt_s <= 0 or chunk <= 0 or max_batch <= 0:
            raise ValueError(f"ranker prompt_s={prompt_s}, chunk={chunk} and "
                             f"max_batch={max_batch} must be > 0")
        self.events, self.clock, self.deliver = events, clock, deliver
        self.prompt_s, self.chunk, self.max_batch = prompt_s, chunk, max_batch
        self.queued: list[Tracker] = []
        self.chunks: list[list[Tracker]] = []  # the running batch's chunks still to score
        self.busy = False
        self.calls = 0  # encoder calls (chunks) so far
        self.busy_s = 0.0  # simulated seconds spent scoring

    def arrive(self, tr: Tracker) -> None:
        self.queued.append(tr)
        if not self.busy:
            self.busy = True  # a DISPATCH-kind event runs after every arrival of this instant
            self.events.push(self.clock.now, DISPATCH, self._next_batch)

    def _next_batch(self, _=None) -> None:
        if not self.queued:
            self.busy = False
            return
        batch = sorted(self.queued[:self.max_batch], key=lambda t: t.req.prompt_tokens)
        del self.queued[:self.max_batch]
        self.chunks = [batch[i:i + self.chunk] for i in range(0, len(batch), self.chunk)]
        self._next_chunk()

    def _next_chunk(self) -> None:
        chunk = self.chunks.pop(0)
        took = len(chunk) * self.prompt_s
        self.calls += 1
        self.busy_s += took
        self.events.push(self.clock.now + took, LANDED, self._chunk_done, chunk)

    def _chunk_done(self, chunk: list[Tracker]) -> None:
        self.deliver(chunk)
        if self.chunks:
            self._next_chunk()
        else:
            self._next_batch()

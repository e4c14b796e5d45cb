"""Queue-ordering policies: in which order waiting requests are dispatched.

Lifecycle: the controller (or simulator) calls ``order(round)`` at every
dispatch opportunity with the waiting requests; it dispatches from the front
while the router finds room, and increments ``waited_rounds`` of the rest.

Starvation guard (Fu et al., "Efficient LLM Scheduling by Learning to Rank"):
a request passed over for ``starvation_rounds`` rounds, or waiting longer
than ``max_wait_s``, is promoted ahead of every other request until it is
dispatched; promoted requests keep arrival order. ``quantum_rounds`` is how
long a promoted request keeps its boost once running (decode-side priority).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from cluster.policies.types import RequestView, SchedulingRound


class SchedulerPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, starvation_rounds: int = 200, quantum_rounds: int = 10,
                 max_wait_s: float | None = None):
        self.starvation_rounds = starvation_rounds
        self.quantum_rounds = quantum_rounds
        self.max_wait_s = max_wait_s

    def order(self, rnd: SchedulingRound) -> list[RequestView]:
        """Waiting requests, first to dispatch first."""
        promoted = [r for r in rnd.waiting if self._starving(r, rnd.now_s)]
        rest = [r for r in rnd.waiting if not self._starving(r, rnd.now_s)]
        promoted.sort(key=lambda r: (r.arrival_s, r.request_id))
        return promoted + sorted(rest, key=self.key)

    def _starving(self, r: RequestView, now_s: float) -> bool:
        by_time = self.max_wait_s is not None and now_s - r.arrival_s >= self.max_wait_s
        return r.waited_rounds >= self.starvation_rounds or by_time

    @abstractmethod
    def key(self, r: RequestView) -> tuple:
        """Sort key among non-promoted requests; smaller goes first."""


class FCFS(SchedulerPolicy):
    name = "fcfs"

    def key(self, r: RequestView) -> tuple:
        return (r.arrival_s, r.request_id)


class SJFOracle(SchedulerPolicy):
    """Shortest job first on the true output length: the upper bound."""

    name = "sjf-oracle"

    def key(self, r: RequestView) -> tuple:
        if r.true_output_tokens is None:
            raise ValueError(f"sjf-oracle needs the true output length of {r.request_id!r}")
        return (r.true_output_tokens, r.arrival_s, r.request_id)


class LearnedRank(SchedulerPolicy):
    """Shortest expected job first by the ranker's score (higher = shorter)."""

    name = "ltr"

    def key(self, r: RequestView) -> tuple:
        score = float("-inf") if r.score is None else r.score
        return (-score, r.arrival_s, r.request_id)

"""Queue-ordering policies: in which order waiting requests are dispatched,
and how strongly a dispatched request holds its place on its decode worker.

Lifecycle: the controller (or simulator) calls ``order(round)`` at every
dispatch opportunity with the waiting requests; it dispatches from the front
while the router finds room, and increments ``waited_rounds`` of the rest.
For each request it dispatches it asks ``placement(request, now)`` for the
decode-side priority and boost, which the decode worker's batch planner uses
to pick a preemption victim when KV memory runs short (lowest first).

Starvation guard (Fu et al., "Efficient LLM Scheduling by Learning to Rank",
NeurIPS 2024, Sec. 4: a request starved for a threshold number of rounds is
promoted for a quantum, then falls back to its rank): a request passed over
for ``starvation_rounds`` rounds is promoted ahead of every other request for
the next ``quantum_rounds`` rounds; if it is still waiting after that, its
count starts again (``waited_rounds`` modulo ``starvation_rounds +
quantum_rounds``), so a burst of requests starving together does not turn
the whole queue into first-come-first-served. A request waiting longer than
``max_wait_s`` is promoted until it is dispatched (a hard wall-clock bound).
Promoted requests keep arrival order among themselves. A request dispatched
while promoted runs with a boost of ``quantum_rounds`` engine steps during
which no unboosted request outranks it for preemption.

Holding for a score (``ltr``): a request the ranker has not scored yet is
held for at most ``score_wait_s`` after its arrival (``hold_until``), unless
promoted; the controller (and simulator) stops a round at the first held
request in the order. Fu et al.'s scheduler scores new arrivals before it
schedules them; dispatching them unscored instead fills free slots in
arrival order, and in a burst those are as long as any (a burst of 300
ShareGPT prompts on 8 slots: 12 dispatched unscored cost ltr about 4% of its
mean latency in the slot model). ``score_wait_s = 0`` dispatches them at
once, after every scored request. The default, 1 s, outlasts the slowest
first chunk of a 300-prompt burst seen on a 2-core CPU (0.5-0.6 s); an idle
cluster waits only as long as one prompt's scoring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

from cluster.policies.types import RequestView, SchedulingRound

_ARRIVAL = attrgetter("arrival_s", "request_id")  # first come, first served
UNRANKED = float("-inf")  # the score of a request the ranker failed on: last, and never waited for


@dataclass(frozen=True)
class Placement:
    """How a dispatched request ranks on its decode worker."""

    priority: float  # higher = preempted later when KV runs short
    boost_steps: int  # engine steps it outranks every unboosted request (starvation quantum)


class SchedulerPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, starvation_rounds: int = 200, quantum_rounds: int = 10,
                 max_wait_s: float | None = None, score_wait_s: float = 1.0):
        if starvation_rounds <= 0 or quantum_rounds <= 0:
            raise ValueError(f"starvation_rounds={starvation_rounds} and quantum_rounds="
                             f"{quantum_rounds} must be > 0")
        if max_wait_s is not None and max_wait_s <= 0:
            raise ValueError(f"max_wait_s={max_wait_s} must be > 0 (or None for no bound)")
        if score_wait_s < 0:
            raise ValueError(f"score_wait_s={score_wait_s} must be >= 0")
        self.starvation_rounds = starvation_rounds
        self.quantum_rounds = quantum_rounds
        self.max_wait_s = max_wait_s
        self.score_wait_s = score_wait_s  # read by schedulers that order by a score (ltr)

    def order(self, rnd: SchedulingRound) -> list[RequestView]:
        """Waiting requests, first to dispatch first."""
        starving, now_s = self.starving, rnd.now_s
        promoted, rest = [], []
        for r in rnd.waiting:
            (promoted if starving(r, now_s) else rest).append(r)
        rest.sort(key=self.key)
        if not promoted:
            return rest
        promoted.sort(key=_ARRIVAL)
        return promoted + rest

    def starving(self, r: RequestView, now_s: float) -> bool:
        """Promoted now: in a quantum, or past the wall-clock bound."""
        if self.max_wait_s is not None and now_s - r.arrival_s >= self.max_wait_s:
            return True
        cycle = self.starvation_rounds + self.quantum_rounds
        return r.waited_rounds % cycle >= self.starvation_rounds

    def rounds_to_change(self, waited_rounds: int) -> int:
        """Rounds a request passed over ``waited_rounds`` times can be passed over
        again before the round count in ``starving`` may answer otherwise (the
        start or end of a quantum). A queue kept in order between rounds (the
        simulator's) asks ``starving`` again only then."""
        cycle = self.starvation_rounds + self.quantum_rounds
        phase = waited_rounds % cycle
        if phase < self.starvation_rounds:
            return self.starvation_rounds - phase
        return cycle - phase

    def hold_until(self, r: RequestView, now_s: float) -> float | None:
        """When a request first in this round's order may be dispatched, if
        later than now (the round stops at it); None: now."""
        return None

    def placement(self, r: RequestView, now_s: float) -> Placement:
        """Decode-side rank of a request being dispatched now."""
        boost = self.quantum_rounds if self.starving(r, now_s) else 0
        return Placement(self.priority(r), boost)

    @abstractmethod
    def key(self, r: RequestView) -> tuple:
        """Sort key among non-promoted requests; smaller goes first."""

    def priority(self, r: RequestView) -> float:
        """Decode-side priority; equal priorities keep arrival order."""
        return 0.0


class FCFS(SchedulerPolicy):
    name = "fcfs"

    def key(self, r: RequestView) -> tuple:
        return (r.arrival_s, r.request_id)


class SJFOracle(SchedulerPolicy):
    """Shortest job first on the true output length: the upper bound."""

    name = "sjf-oracle"

    def key(self, r: RequestView) -> tuple:
        return (self._length(r), r.arrival_s, r.request_id)

    def priority(self, r: RequestView) -> float:
        return -float(self._length(r))

    @staticmethod
    def _length(r: RequestView) -> int:
        if r.true_output_tokens is None:
            raise ValueError(f"sjf-oracle needs the true output length of {r.request_id!r}")
        return r.true_output_tokens


class LearnedRank(SchedulerPolicy):
    """Shortest expected job first by the ranker's score (higher = shorter);
    a request not scored yet goes after every scored one."""

    name = "ltr"

    def key(self, r: RequestView) -> tuple:
        return (-self.priority(r), r.arrival_s, r.request_id)

    def priority(self, r: RequestView) -> float:
        return UNRANKED if r.score is None else r.score

    def hold_until(self, r: RequestView, now_s: float) -> float | None:
        """An unscored request waits for its score until ``score_wait_s``
        after its arrival, unless promoted."""
        if r.score is not None:
            return None
        until = r.arrival_s + self.score_wait_s
        return until if until > now_s and not self.starving(r, now_s) else None

"""Per-request bookkeeping of one simulation run.

Lifecycle: the simulator makes one ``Tracker`` per request when it arrives;
the controller, the workers and the transfer network stamp it as the request
moves (dispatched, first token, each later token, finished); ``sim.metrics``
reads the finished trackers. Slotted: a million of them stay small.
"""

from __future__ import annotations

from sim.workload import Request
from workers.sequence import Sequence


class Tracker:
    __slots__ = ("req", "seq", "dispatch_s", "first_token_s", "last_token_s", "max_gap_s",
                 "finish_s", "prefill_worker", "decode_worker", "preemptions", "prefill_left",
                 "transfer_s", "rejected", "score", "priority", "boost_steps")

    def __init__(self, req: Request, score: float | None = None):
        self.req = req  # the workload's request
        self.seq: Sequence | None = None  # the engine sequence while a worker holds it
        self.dispatch_s: float | None = None  # when the router placed it
        self.first_token_s: float | None = None  # first token sampled (TTFT end)
        self.last_token_s = 0.0  # latest token's time
        self.max_gap_s = 0.0  # longest gap between two consecutive tokens (worst TBT)
        self.finish_s: float | None = None  # last token sampled
        self.prefill_worker = ""  # worker ids of its route
        self.decode_worker = ""
        self.preemptions = 0  # times its KV was dropped and recomputed
        self.prefill_left = 0  # prompt tokens its current worker still has to prefill
        self.transfer_s = 0.0  # time its KV spent on the link (disaggregated)
        self.rejected = ""  # admission refusal reason ("" = accepted)
        self.score = score  # simulated ranker score (ltr policy)
        # its rank on the worker that decodes it (the scheduler's ``placement`` at
        # dispatch, as the controller sends it): who is preempted first when KV runs short
        self.priority = 0.0
        self.boost_steps = 0

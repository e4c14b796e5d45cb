"""The simulated ranker takes time, as the controller's does: a burst is scored
in length-sorted chunks, each chunk's scores land when it ends; a request
waits for its score at most ``scheduler.score_wait_s``, and one dispatched
before its score is served unranked (after every scored one while they wait)."""

from dataclasses import replace

import pytest

from sim.core import Simulation
from sim.events import Clock, EventQueue
from sim.ranker import SimRanker
from sim.tracker import Tracker
from sim.workload import Request, Workload, WorkloadSpec


def test_a_burst_is_scored_in_length_sorted_chunks_batch_by_batch():
    events, clock, landed = EventQueue(), Clock(), []
    ranker = SimRanker(events, clock, lambda chunk: landed.append(
        (round(clock.now, 6), [t.req.request_id for t in chunk])), prompt_s=0.1, chunk=2,
        max_batch=4)
    lengths = [50, 10, 40, 20, 30, 60]
    for i, n in enumerate(lengths):
        ranker.arrive(Tracker(Request(i, 0.0, n, 5)))
    while events.heap:
        clock.now, fn, arg = events.pop()
        fn(arg)
    # first batch: the first 4 arrivals, shortest prompt first; then the 2 left
    assert landed == [(0.2, ["r1", "r3"]), (0.4, ["r2", "r0"]), (0.6, ["r4", "r5"])]
    assert (ranker.calls, ranker.busy, round(ranker.busy_s, 6)) == (3, False, 0.6)


def test_bad_ranker_settings_are_refused(make_spec):
    with pytest.raises(ValueError, match="ranker_prompt_s=-1"):
        make_spec(ranker_prompt_s=-1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        SimRanker(EventQueue(), Clock(), print, prompt_s=0.1, chunk=0)


def _dispatch(make_spec, prompt_s: float, score_wait_s: float):
    spec = make_spec(scheduler="ltr", ranker_noise=0.0, ranker_prompt_s=prompt_s,
                     batch={"max_num_seqs": 1, "max_num_batched_tokens": 2048,
                            "prefill_chunk_size": 512})
    spec = replace(spec, scheduler=replace(spec.scheduler, score_wait_s=score_wait_s))
    outs = [40, 30, 20, 10, 5, 35]  # a burst: with perfect scores, ltr is shortest first
    reqs = [Request(i, 0.0, 16, n) for i, n in enumerate(outs)]
    res = Simulation(spec, Workload(WorkloadSpec(num_requests=len(reqs)), reqs,
                                    closed=False)).run()
    assert [t.req.output_tokens for t in res.trackers] == outs  # every request served
    return res


def _dispatch_order(make_spec, prompt_s: float, score_wait_s: float) -> list[str]:
    return _dispatch(make_spec, prompt_s, score_wait_s).dispatch_order


def test_requests_dispatched_before_their_score_go_unranked(make_spec):
    assert _dispatch_order(make_spec, 0.0, 0.0) == ["r4", "r3", "r2", "r1", "r5", "r0"]
    # scoring takes 6 x 1 ms, less than any request holds the one slot: the slot takes
    # the first arrival unscored; the rest get their scores meanwhile and go shortest first
    assert _dispatch_order(make_spec, 0.001, 0.0) == ["r0", "r4", "r3", "r2", "r1", "r5"]
    # scoring slower than serving: everything goes before its score, in arrival order
    assert _dispatch_order(make_spec, 10.0, 0.0) == ["r0", "r1", "r2", "r3", "r4", "r5"]


def test_requests_wait_for_their_score_up_to_score_wait_s(make_spec):
    # the slot stays free 6 ms for the scores: shortest first from the start
    assert _dispatch_order(make_spec, 0.001, 0.5) == ["r4", "r3", "r2", "r1", "r5", "r0"]
    # a dead-slow ranker (one chunk of 6: 60 s) holds the burst only 0.5 s, then arrival order
    res = _dispatch(make_spec, 10.0, 0.5)
    assert res.dispatch_order == ["r0", "r1", "r2", "r3", "r4", "r5"]
    first = min(res.trackers, key=lambda t: t.finish_s)
    assert first.req.request_id == "r0" and first.finish_s > 0.5
    no_wait = min(_dispatch(make_spec, 10.0, 0.0).trackers, key=lambda t: t.finish_s)
    assert first.finish_s - no_wait.finish_s == pytest.approx(0.5, abs=1e-6)

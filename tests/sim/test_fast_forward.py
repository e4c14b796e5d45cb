"""Fast-forwarded decode batches give the per-step planner's results: the same
decisions (routes, dispatch order, rounds, preemptions, steps, tokens) and the
same times up to float rounding (closed-form sums instead of step-by-step ones)."""

import math

import pytest

from sim.decode_batch import DecodeBatch, DecodeWindow
from sim.hardware import get_gpu
from sim.latency import LatencyModel, profile_for
from sim.models import get_model
from sim.runner import simulate
from sim.tracker import Tracker
from sim.workload import Request, WorkloadSpec
from workers.sampling import SamplingParams
from workers.sequence import Sequence

TIMES = ("dispatch_s", "first_token_s", "last_token_s", "finish_s", "max_gap_s", "transfer_s")


def assert_same_run(exact, fast):
    assert fast.dispatch_order == exact.dispatch_order
    for a, b in zip(exact.trackers, fast.trackers, strict=True):
        assert (a.preemptions, a.rejected, a.prefill_worker, a.decode_worker) == \
               (b.preemptions, b.rejected, b.prefill_worker, b.decode_worker)
        for name in TIMES:
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or math.isclose(x, y, rel_tol=1e-9)), \
                (a.req, name, x, y)
    for a, b in zip(exact.workers, fast.workers, strict=True):
        sa, sb = a.stats, b.stats
        assert (sa.steps, sa.prefill_tokens, sa.decode_tokens, sa.preemptions) == \
               (sb.steps, sb.prefill_tokens, sb.decode_tokens, sb.preemptions)
        assert math.isclose(sa.busy_s, sb.busy_s, rel_tol=1e-9)
        assert math.isclose(sa.flops, sb.flops, rel_tol=1e-9)
    ea, eb = exact.summary.extra, fast.summary.extra
    assert ea["dispatch_rounds"] == eb["dispatch_rounds"] and ea["transfers"] == eb["transfers"]


def both(make_spec, mode, workload, **options):
    runs = [simulate(make_spec(mode, replicas=2, decode=2, fast_forward=ff, **options), workload)
            for ff in (False, True)]
    assert_same_run(*runs)
    return runs


POISSON = WorkloadSpec(arrival="poisson", rate=20, num_requests=120, lengths="azure-conv", seed=3)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_batches_match_planner_steps_with_preemption(make_spec, mode):
    # L4 at 80% memory: little KV room, so the planner preempts
    exact, fast = both(make_spec, mode, POISSON, memory_utilization=0.8)
    assert fast.summary.preemptions == exact.summary.preemptions > 0
    assert fast.summary.extra["windows"] > 0
    # requests that starved in the queue decode boosted for a quantum, and a boosted
    # sequence goes through the planner: 0.26-0.51 of the calls on these traces
    assert fast.summary.extra["planner_calls"] < exact.summary.extra["planner_calls"] * 0.6


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_batches_match_with_a_queue_and_starvation_rounds(make_spec, mode):
    # overloaded with a bounded queue: rounds at every step boundary decide who is
    # promoted (sjf-oracle's starvation guard) and who is refused
    wl = WorkloadSpec(arrival="poisson", rate=60, num_requests=300, lengths="azure-conv", seed=4)
    exact, fast = both(make_spec, mode, wl, scheduler="sjf-oracle", max_waiting=40)
    assert exact.summary.rejected > 0


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_batches_match_closed_loop_with_whole_prompt_steps(make_spec, mode):
    wl = WorkloadSpec(arrival="closed", concurrency=24, num_requests=150, lengths="azure-conv",
                      seed=5)
    batch = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "prefill_chunk_size": 8192}
    exact, fast = both(make_spec, mode, wl, batch=batch, memory_utilization=0.9)
    # the planner runs for admissions only: once per prompt, not once per step
    assert fast.summary.extra["planner_calls"] < exact.summary.extra["planner_calls"] / 10


def test_decode_line_is_the_step_time_of_a_decode_batch():
    lat = LatencyModel(get_model("llama-3.1-8b"), get_gpu("H100"), 1, "bf16", profile_for("H100-SXM"))
    fixed, per_token = lat.decode_line(13)
    for kv in (13, 5000, 130_000):
        assert math.isclose(lat.step_time(13, 13, 13, kv), fixed + per_token * kv, rel_tol=1e-12)


def test_window_times_are_the_sum_of_their_steps():
    w = DecodeWindow(2.0, 10, 30, 0.015, 1e-6)
    ends, t = {9: 2.0}, 2.0
    for s in range(10, 31):
        t += w.duration(s)
        ends[s] = t
        assert math.isclose(w.end(s), t, rel_tol=1e-12)
    for s in range(10, 31):
        assert w.step_at(w.end(s)) == min(s + 1, 30)  # a step ending now is done
        assert w.step_at(w.end(s), before_step_done=True) == s
        assert w.step_at((ends[s - 1] + ends[s]) / 2) == s


def test_batch_blocks_and_finishes_match_each_sequence():
    bs, batch, seqs = 16, DecodeBatch(16), []
    for i, (computed, steps_done, out_len) in enumerate([(100, 5, 40), (16, 7, 3), (31, 7, 9),
                                                         (47, 12, 25)]):
        seq = Sequence(f"r{i}", [0] * computed, SamplingParams(max_tokens=out_len), i,
                       output_token_ids=[0])
        seq.num_computed_tokens = computed
        tr = Tracker(Request(i, 0.0, computed, out_len))
        batch.join(seq, tr, steps_done, -(-computed // bs))
        seqs.append((computed, steps_done, -(-computed // bs)))
    for step in range(13, 40):  # every member is in the batch from step 13
        held = sum(-(-(c + step - k) // bs) - table for c, k, table in seqs)
        assert batch.growth(step) == held
        assert batch.kv_tokens(step) == sum(c + step - k for c, k, _ in seqs)
    assert batch.last_fitting_step(13, 39, batch.growth(30)) == max(
        s for s in range(13, 40) if batch.growth(s) <= batch.growth(30))
    # finishes at the step sampling the last output token: 7 + 3 - 1, 7 + 9 - 1, ...
    batch.growth(9)  # (the last growth, kept up to date as members leave)
    assert [m.seq.request_id for m in batch.pop_finished(9)] == ["r1"]
    for step in range(9, 15):
        assert batch.growth(step) == sum(-(-(c + step - k) // bs) - table
                                         for c, k, table in (seqs[0], seqs[2], seqs[3]))
    assert batch.next_finish() == 15 and batch.pop_finished(15)[0].seq.request_id == "r2"
    for step in range(15, 40):
        assert batch.growth(step) == sum(-(-(c + step - k) // bs) - table
                                         for c, k, table in (seqs[0], seqs[3]))


def test_window_cursor_follows_step_at_and_growth_through_cuts():
    # the views' cursor (``advance``) against ``step_at`` and ``DecodeBatch.growth``
    # (and how long that growth holds) at every step end, just before and between ends, with cuts behind and ahead
    bs, batch = 16, DecodeBatch(16)
    for i, computed in enumerate((100, 16, 31, 47, 58, 63)):
        seq = Sequence(f"r{i}", [0] * computed, SamplingParams(max_tokens=500), i,
                       output_token_ids=[0])
        seq.num_computed_tokens = computed
        batch.join(seq, Tracker(Request(i, 0.0, computed, 500)), 12, -(-computed // bs))
    w = DecodeWindow(2.0, 13, 60, 0.015, 1e-5, batch.growth(13), batch.phase)
    times = sorted({t for s in range(12, 61) for t in
                    (w.end(s), w.end(s) - 1e-9, (w.end(s) + w.end(s + 1)) / 2)})
    for t in times:
        if t > w.end(40) and w.last == 60:
            w.last = w.step_at(t) - 2  # cut behind the cursor
        elif t > w.end(30) and w.last == 60:
            w.last = 45  # cut ahead of it
        until, blocks = w.advance(t)
        step = w.step_at(t)  # from the cursor when t is inside its step
        assert step == next((s for s in range(w.first, w.last + 1) if w.end(s) > t), w.last)
        assert w.step_at(t, before_step_done=True) == next(
            (s for s in range(w.first, w.last + 1) if w.end(s) >= t), w.last)
        assert blocks == batch.growth(step), t
        # it holds until the end of the last step before the next that takes a block
        held = step
        while held < w.last and batch.growth(held + 1) == blocks:
            held += 1
        assert until == w.end(held), t

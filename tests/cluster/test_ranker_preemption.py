"""Decode-side ranking: under KV pressure the lowest-ranked running request is
preempted first, a boosted one (starvation quantum) is spared, and every
preempted request resumes with exactly the output it would have had."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from workers.batch_planner import BatchConfig, BatchPlanner
from workers.block_manager import BlockManager
from workers.sampling import SamplingParams
from workers.sequence import Sequence, SequenceStatus

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Decode-sized matmuls run many times slower on two threads of shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(lens, seed=3):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lens]


def _running(planner: BatchPlanner, specs) -> list[Sequence]:
    """Sequences admitted and fully prefilled, each filling whole blocks."""
    running = []
    for i, (priority, boost) in enumerate(specs):
        seq = Sequence(f"r{i}", list(range(16)), GREEDY, arrival=i, priority=priority,
                       boost_steps=boost)
        assert planner.blocks.allocate(seq.request_id, seq.token_ids) is not None
        seq.output_token_ids = [1]  # next step needs a 17th token: one new block
        seq.num_computed_tokens, seq.status = 16, SequenceStatus.RUNNING
        running.append(seq)
    return running


def test_lowest_ranked_running_request_is_preempted_first():
    planner = BatchPlanner(BatchConfig(), BlockManager(5, 16, False))
    running = _running(planner, [(-5.0, 0), (2.0, 0), (1.0, 0), (3.0, 0)])  # 4 of 5 blocks used
    waiting: deque[Sequence] = deque()
    plan = planner.plan(waiting, running)
    # one free block: only one sequence can grow per freed block, so the two
    # lowest-ranked ones (r0 at -5, then r2 at 1.0) give theirs up
    assert [s.request_id for s in plan.preempted] == ["r0", "r2"]
    assert [s.request_id for s in running] == ["r3", "r1"]
    assert [s.request_id for s in waiting] == ["r2", "r0"]


def test_equal_priorities_keep_the_old_order_latest_admitted_goes_first():
    planner = BatchPlanner(BatchConfig(), BlockManager(5, 16, False))
    running = _running(planner, [(0.0, 0)] * 4)
    plan = planner.plan(deque(), running)
    assert [s.request_id for s in plan.preempted] == ["r3", "r2"]


def test_a_boosted_request_is_spared_during_its_quantum():
    planner = BatchPlanner(BatchConfig(), BlockManager(5, 16, False))
    running = _running(planner, [(-5.0, 3), (2.0, 0), (1.0, 0), (3.0, 0)])
    plan = planner.plan(deque(), running)
    assert [s.request_id for s in plan.preempted] == ["r2", "r1"]
    assert running[0].request_id == "r0" and running[0].boost_steps == 2  # one step used


def test_preempted_requests_resume_with_identical_output(make_engine):
    prompts = _prompts([60, 50, 70, 40])
    ref = make_engine().generate(prompts, GREEDY)
    engine = make_engine(num_kv_blocks=14, block_size=16)
    victims = []
    plan_fn = engine.planner.plan

    def spy(waiting, running):
        plan = plan_fn(waiting, running)
        victims.extend(s.request_id for s in plan.preempted)
        return plan

    engine.planner.plan = spy
    # the first admitted request ranks lowest: arrival order alone would spare it
    for i, (p, prio) in enumerate(zip(prompts, [-9.0, 1.0, 2.0, 3.0], strict=True)):
        engine.add_request(f"r{i}", p, GREEDY, priority=prio)
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    assert victims and victims[0] == "r0"
    assert [outs[f"r{i}"] for i in range(4)] == [r.token_ids for r in ref]
    assert engine.blocks.num_free_blocks == 14

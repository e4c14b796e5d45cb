"""The indexed waiting queue gives the orders the scheduler's own ``order`` gives
over every waiting view (``ScannedQueue``), round after round, with requests
joining, leaving, rescored while they wait (scores that come back late) and
passed over into and out of starvation quanta."""

import random

import pytest

from cluster.policies import RequestView, make_scheduler
from sim.waiting import IndexedQueue, ScannedQueue, make_queue


def one_round(queue, now, index, rng):
    """What ``SimController._round`` does with a queue: a lone request never
    passed over is its own order; dispatch a random prefix of the order."""
    waiting = queue.views
    if len(waiting) == 1 and queue.lone_in_order:
        order = waiting
    else:
        order = queue.order(now, index)
    shown = []
    sent = rng.randrange(len(waiting) + 1) if rng.random() < 0.3 else 0
    for view in order:  # the controller stops at the first request with no route
        shown.append(view)
        if len(shown) > sent:
            break
    if sent == len(waiting):
        waiting.clear() if order is waiting else queue.clear()
    else:
        queue.settle(order, sent, now)
    return shown


@pytest.mark.parametrize("policy", ["fcfs", "sjf-oracle", "ltr"])
@pytest.mark.parametrize("seed", range(6))
def test_indexed_orders_equal_the_scheduler_order(policy, seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(policy, starvation_rounds=rng.choice([1, 3, 7]),
                               quantum_rounds=rng.choice([1, 2, 5]))
    scanned, indexed = ScannedQueue(scheduler), IndexedQueue(scheduler)
    now, n, rescored = 0.0, 0, 0
    for index in range(1, 400):
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):
            now += rng.choice([0.0, 0.25])  # equal arrival times: ties by id
            view = RequestView(f"r{rng.randrange(10**6)}-{n}", rng.randrange(1, 50),
                               rng.randrange(1, 9), now,
                               score=rng.choice([None, rng.randrange(4) / 4]),
                               true_output_tokens=rng.randrange(1, 6))
            n += 1
            scanned.views.append(view)
            indexed.views.append(view)
        if not scanned.views:
            continue
        for _ in range(rng.choice([0, 0, 0, 1, 3])):  # scores coming back, some after a round
            rid = rng.choice(scanned.views).request_id
            score = rng.choice([None, rng.randrange(4) / 4])
            scanned.rescore(rid, score, now)
            indexed.rescore(rid, score, now)
            rescored += 1
        state = rng.getstate()
        a = one_round(scanned, now, index, rng)
        rng.setstate(state)
        b = one_round(indexed, now, index, rng)
        assert a == b  # the same requests in the same order, with the same counts
        assert len(scanned.views) == len(indexed.views)
    assert n > 300 and rescored > 50


def test_rescoring_moves_a_waiting_request_and_keeps_its_count():
    for queue in (ScannedQueue(make_scheduler("ltr")), IndexedQueue(make_scheduler("ltr"))):
        queue.views.extend(RequestView(f"r{i}", 1, 1, float(i), score=None) for i in range(3))
        order = list(queue.order(0.0, 1))
        assert [v.request_id for v in order] == ["r0", "r1", "r2"]  # unscored: by arrival
        queue.settle(order, 0, 0.0)
        queue.rescore("r2", 0.5, 0.0)
        queue.rescore("r1", 0.9, 0.0)
        queue.rescore("gone", 1.0, 0.0)  # a request no longer waiting: nothing changes
        order = list(queue.order(0.0, 2))
        assert [(v.request_id, v.score, v.waited_rounds) for v in order] == [
            ("r1", 0.9, 1), ("r2", 0.5, 1), ("r0", None, 1)]


def test_rounds_to_change_names_every_change_of_starving():
    s = make_scheduler("fcfs", starvation_rounds=4, quantum_rounds=3)
    starving = [s.starving(RequestView("r", 1, 1, 0.0, w), 0.0) for w in range(40)]
    for w in range(30):
        k = s.rounds_to_change(w)
        assert k > 0 and starving[w:w + k] == [starving[w]] * k
        assert starving[w + k] != starving[w]


def test_queue_kind():
    assert isinstance(make_queue(make_scheduler("ltr")), IndexedQueue)
    assert isinstance(make_queue(make_scheduler("fcfs", max_wait_s=5.0)), ScannedQueue)

import pytest

from sim.events import Clock, EventQueue
from sim.transfer import Link, TransferNetwork


def run(q, clock):
    while q:
        clock.now, fn, arg = q.pop()
        fn(arg)


def test_two_flows_share_a_sender_link_fairly():
    q, clock = EventQueue(), Clock()
    net = TransferNetwork(q, clock, latency_s=0.001)
    src, d1, d2 = Link("p0", 100.0), Link("d0", 1000.0), Link("d1", 1000.0)
    done = {}
    # step [0, 1] with 4 layers: 100 B over 100 B/s -> start = max(0.25, 1 - 3*25/100) = 0.25
    net.plan(src, d1, 100.0, 4, 0.0, 1.0, lambda: done.setdefault("a", clock.now))
    net.plan(src, d2, 100.0, 4, 0.0, 1.0, lambda: done.setdefault("b", clock.now))
    run(q, clock)
    # both start at 0.25 and share 100 B/s: 200 B take 2 s
    assert done["a"] == pytest.approx(2.251) and done["b"] == pytest.approx(2.251)


def test_uncontended_flow_overlaps_the_prefill_step():
    q, clock = EventQueue(), Clock()
    net = TransferNetwork(q, clock, latency_s=0.0)
    done = []
    # fast link: the last layer leaves right after the step ends: t1 + s/B
    net.plan(Link("p", 1000.0), Link("d", 1000.0), 400.0, 4, 0.0, 1.0, lambda: done.append(clock.now))
    run(q, clock)
    assert done == [pytest.approx(1.0 + 100 / 1000)]

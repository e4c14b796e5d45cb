"""Pure policies: exact orders and routes on hand-built snapshots."""

from __future__ import annotations

import pytest

from cluster.policies import (
    BoundedQueue,
    RequestView,
    SchedulingRound,
    WorkerView,
    make_router,
    make_scheduler,
)


def req(rid, arrival, out=None, score=None, waited=0, prompt=10, max_tokens=10):
    return RequestView(rid, prompt, max_tokens, arrival, waited, score, out)


def worker(wid, role="decode", queued=0, running=0, free=100):
    return WorkerView(wid, role, "H100", queued, running, free, 100, 16, 64, 8)


def order(name, reqs, **kw):
    return [r.request_id for r in make_scheduler(name, **kw).order(
        SchedulingRound(100.0, 0, tuple(reqs)))]


def test_fcfs_orders_by_arrival():
    assert order("fcfs", [req("b", 2), req("a", 1), req("c", 3)]) == ["a", "b", "c"]


def test_sjf_oracle_orders_by_true_length_then_arrival():
    reqs = [req("a", 1, out=50), req("b", 2, out=5), req("c", 3, out=5), req("d", 4, out=20)]
    assert order("sjf-oracle", reqs) == ["b", "c", "d", "a"]


def test_sjf_oracle_without_lengths_is_an_error():
    with pytest.raises(ValueError, match="sjf-oracle needs the true output length of 'a'"):
        order("sjf-oracle", [req("a", 1)])


def test_ltr_orders_by_score_descending():
    reqs = [req("a", 1, score=0.1), req("b", 2, score=2.0), req("c", 3, score=1.0)]
    assert order("ltr", reqs) == ["b", "c", "a"]


def test_starvation_guard_promotes_after_n_rounds_in_arrival_order():
    reqs = [req("long1", 1, out=900, waited=200), req("short", 2, out=1),
            req("long2", 0.5, out=800, waited=205)]
    assert order("sjf-oracle", reqs, starvation_rounds=200) == ["long2", "long1", "short"]
    # after its quantum (10 rounds) a request falls back to its rank and counts again
    reqs[2] = req("long2", 0.5, out=800, waited=210)
    assert order("sjf-oracle", reqs, starvation_rounds=200) == ["long1", "short", "long2"]


def test_wall_clock_bound_promotes_too():
    reqs = [req("old", 10.0, out=900), req("new", 99.0, out=1)]
    assert order("sjf-oracle", reqs, max_wait_s=60.0) == ["old", "new"]
    assert order("sjf-oracle", reqs, max_wait_s=None) == ["new", "old"]


def test_round_robin_rotates_per_role():
    router = make_router("round-robin")
    prefill = [worker("p1", "prefill"), worker("p0", "prefill")]
    decode = [worker("d0"), worker("d1")]
    routes = [router.route(req(f"r{i}", i), prefill, decode) for i in range(3)]
    assert [(r.prefill_worker, r.decode_worker) for r in routes] == [
        ("p0", "d0"), ("p1", "d1"), ("p0", "d0")]


def test_least_loaded_picks_shortest_prefill_queue_and_most_free_blocks():
    router = make_router("least-loaded")
    prefill = [worker("p0", "prefill", queued=50), worker("p1", "prefill", queued=5)]
    decode = [worker("d0", free=10), worker("d1", free=90)]
    route = router.route(req("r", 0), prefill, decode)
    assert (route.prefill_worker, route.decode_worker) == ("p1", "d1")


def test_no_room_means_no_route():
    router = make_router("least-loaded")
    full_decode = [worker("d0", free=1)]  # needs 2 blocks for 20 tokens at 16 per block
    assert router.route(req("r", 0), [worker("p0", "prefill")], full_decode) is None
    busy_prefill = [worker("p0", "prefill", queued=120)]  # room 2*64-120 = 8 < 10
    assert router.route(req("r", 0), busy_prefill, [worker("d0")]) is None


def test_prefix_aware_prefers_longest_cached_prefix():
    router = make_router("prefix-aware")
    prefill = [worker("p0", "prefill"), worker("p1", "prefill", queued=30)]
    route = router.route(req("r", 0), prefill, [worker("d0")], {"p1": 3, "p0": 1})
    assert route.prefill_worker == "p1"
    route = router.route(req("r", 0), prefill, [worker("d0")], {})
    assert route.prefill_worker == "p0"


def test_colocated_routes_to_one_mixed_worker():
    router = make_router("least-loaded")
    mixed = [worker("m0", "mixed", queued=40), worker("m1", "mixed")]
    route = router.route(req("r", 0), mixed, mixed)
    assert route.prefill_worker == route.decode_worker == "m1"


def test_bounded_queue():
    q = BoundedQueue(2)
    assert q.admit(1, req("a", 0)).accepted
    refused = q.admit(2, req("b", 0))
    assert not refused.accepted and refused.reason == "overloaded: 2 requests waiting (limit 2)"
    with pytest.raises(ValueError, match="max_waiting=0"):
        BoundedQueue(0)


def test_unknown_policy_names_are_rejected():
    with pytest.raises(ValueError, match="scheduler 'x' is unknown; known: fcfs, sjf-oracle, ltr"):
        make_scheduler("x")
    with pytest.raises(ValueError, match="router 'y' is unknown"):
        make_router("y")


@pytest.mark.parametrize("cls", [RequestView, WorkerView])
def test_written_out_constructors_match_the_dataclass_fields(cls):
    import dataclasses
    import inspect
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default for f in fields]
    v = worker("w") if cls is WorkerView else req("r", 1.0)
    assert dataclasses.replace(v) == v and hash(dataclasses.replace(v)) == hash(v)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.request_id = "x" if cls is RequestView else None


def test_routes_agree_with_the_fit_rules():
    import random

    from cluster.policies.router import decode_fits, prefill_fits
    rng = random.Random(0)
    for trial in range(300):
        role = "mixed" if trial % 2 else None
        views = [WorkerView(f"w{i}", role or rng.choice(["prefill", "decode"]), "H100",
                            rng.choice([0, 0, 50, 200, 900]), rng.randrange(0, 10),
                            rng.randrange(0, 12), 100, rng.choice([4, 16]), 256,
                            rng.randrange(1, 10), rng.random() > 0.1) for i in range(6)]
        r = req("r", 0, prompt=rng.randrange(1, 600), max_tokens=rng.randrange(1, 60))
        prefill = [v for v in views if v.role in ("prefill", "mixed")]
        decode = [v for v in views if v.role in ("decode", "mixed")]
        for name in ("least-loaded", "round-robin"):
            route = make_router(name).route(r, prefill, decode)
            ref = make_router(name)
            if role == "mixed":
                w = ref.pick(r, [v for v in decode if prefill_fits(v, r) and decode_fits(v, r)],
                             {}, "prefill")
                expected = (w.worker_id, w.worker_id) if w else None
            else:
                p = ref.pick(r, [v for v in prefill if prefill_fits(v, r)], {}, "prefill")
                d = ref.pick(r, [v for v in decode if decode_fits(v, r)], {}, "decode")
                expected = (p.worker_id, d.worker_id) if p and d else None
            assert (route and (route.prefill_worker, route.decode_worker)) == expected


def test_least_loaded_prefill_pick_is_the_first_smallest_load():
    import random
    from operator import attrgetter

    from cluster.policies.router import decode_fits, prefill_fits
    key = attrgetter("queued_prefill_tokens", "running", "worker_id")
    rng = random.Random(1)
    for _ in range(500):  # many ties, duplicate ids included: the first smallest wins
        views = [WorkerView(f"w{rng.randrange(4)}", "mixed", "H100", rng.choice([0, 0, 16, 300]),
                            rng.randrange(3), rng.randrange(0, 12), 100, rng.choice([4, 16]),
                            256, rng.randrange(1, 4), rng.random() > 0.1)
                 for _ in range(rng.randrange(1, 9))]
        assert make_router("least-loaded").pick(req("r", 0), views, {}, "prefill") \
            is min(views, key=key)
        # and the mixed pool's own pass (fit rules and keys at once)
        r = req("r", 0, prompt=rng.randrange(1, 600), max_tokens=rng.randrange(1, 60))
        fitting = [v for v in views if prefill_fits(v, r) and decode_fits(v, r)]
        assert make_router("least-loaded").pick_mixed(r, views, {}) is \
            (min(fitting, key=key) if fitting else None)


def test_with_load_is_replace_of_the_load_fields():
    import dataclasses
    v = worker("w", free=7)
    w = v.with_load(5, 3, 2)
    assert w == dataclasses.replace(v, queued_prefill_tokens=5, running=3, free_kv_blocks=2)
    assert hash(w) == hash(dataclasses.replace(w)) and v.free_kv_blocks == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.running = 4

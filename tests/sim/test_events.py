from sim.events import EventKind, EventQueue


def test_ties_break_by_time_then_kind_then_push_order():
    q, seen = EventQueue(), []
    q.push(1.0, EventKind.WAKE, seen.append, "wake@1")
    q.push(1.0, EventKind.ARRIVAL, seen.append, "arrival@1 first")
    q.push(0.5, EventKind.DISPATCH, seen.append, "dispatch@0.5")
    q.push(1.0, EventKind.ARRIVAL, seen.append, "arrival@1 second")
    q.push(1.0, EventKind.LANDED, seen.append, "transfer@1")
    q.push(1.0, EventKind.STEP_DONE, seen.append, "step@1")
    while q:
        _, fn, arg = q.pop()
        fn(arg)
    assert seen == ["dispatch@0.5", "transfer@1", "step@1", "arrival@1 first",
                    "arrival@1 second", "wake@1"]

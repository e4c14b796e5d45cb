"""The queue-depth scaling policy: exact decisions for known loads, bounds
and step limits for any load, and no flapping under a steady load."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import AutoscaleSpec
from cluster.policies.registry import SCALERS, make_scaler
from cluster.policies.scaling import (
    DOWN,
    HOLD,
    UP,
    QueueDepth,
    ReplicaView,
    ScalingSnapshot,
    pick_to_retire,
)

SPEC = AutoscaleSpec(max_replicas=4, min_replicas=1, target_waiting_per_replica=4,
                     target_kv_usage=0.8, upscale_delay_s=0, downscale_delay_s=0, max_step=4)


def snap(waiting=0, running=0, replicas=1, pending=0, kv=0.0, seqs=8, now=100.0, since=100.0):
    return ScalingSnapshot("decode", now, waiting, running, replicas, pending, kv, seqs, since)


@pytest.mark.parametrize("s,desired,action,signal", [
    (snap(), 1, HOLD, "queue wants 0"),  # idle at min
    (snap(waiting=4), 1, HOLD, "queue wants 1"),  # queue within target: keep
    (snap(waiting=5), 2, UP, "queue wants 2"),
    (snap(waiting=9, replicas=2), 3, UP, "queue wants 3"),
    (snap(waiting=9, replicas=1, pending=2), 3, HOLD, "queue wants 3"),  # pods on the way
    (snap(waiting=100), 4, UP, "queue wants 9"),  # capped at max_replicas
    (snap(kv=0.9, running=4), 2, UP, "kv wants 2"),
    (snap(replicas=3, kv=0.2, running=6), 1, DOWN, "kv wants 1"),
    (snap(replicas=3, kv=0.1, running=12), 2, DOWN, "batch wants 2"),
    (snap(replicas=3, running=17), 3, HOLD, "batch wants 3"),
    (snap(replicas=2, waiting=1), 2, HOLD, "queue wants 2"),  # full pool: no scale-down
    # 2 x 0.38 = 0.76 would fit one replica under 0.8, but not under 0.72 (headroom)
    (snap(replicas=2, kv=0.38), 2, HOLD, "kv wants 2"),
    (snap(replicas=2, kv=0.35), 1, DOWN, "kv wants 1"),
])
def test_decision_for_a_load(s, desired, action, signal):
    d = QueueDepth(SPEC).decide(s)
    assert (d.desired_replicas, d.action) == (desired, action)
    assert signal in d.reason, d.reason


@pytest.mark.parametrize("replicas,pending,desired,action", [
    (0, 0, 1, UP), (5, 0, 4, DOWN), (6, 1, 4, DOWN)])
def test_outside_the_bounds_corrects_at_once(replicas, pending, desired, action):
    spec = replace(SPEC, upscale_delay_s=60, downscale_delay_s=60)
    d = QueueDepth(spec).decide(snap(replicas=replicas, pending=pending, since=0))
    assert (d.desired_replicas, d.action) == (desired, action)


def test_max_step_limits_one_decision():
    d = QueueDepth(replace(SPEC, max_step=1)).decide(snap(waiting=100))
    assert (d.desired_replicas, d.action) == (2, UP)


def test_scale_up_waits_for_the_upscale_delay():
    policy = QueueDepth(replace(SPEC, upscale_delay_s=5))
    busy = dict(waiting=20)
    assert policy.decide(snap(now=10, **busy)).action == HOLD
    assert policy.decide(snap(now=14, **busy)).action == HOLD
    assert "up in 1.0 s" in policy.decide(snap(now=14, **busy)).reason
    assert policy.decide(snap(now=15, **busy)).desired_replicas == 2  # 20 over 8 slots + 4 waiting each


def test_an_interrupted_wish_starts_its_delay_again():
    policy = QueueDepth(replace(SPEC, downscale_delay_s=10))
    idle = dict(replicas=3)
    assert policy.decide(snap(now=0, **idle)).action == HOLD
    assert policy.decide(snap(now=8, waiting=3, **idle)).action == HOLD  # busy again: reset
    assert policy.decide(snap(now=12, **idle)).action == HOLD  # wanted down for 0 s
    assert policy.decide(snap(now=21, **idle)).action == HOLD
    d = policy.decide(snap(now=22, **idle))
    assert (d.desired_replicas, d.action) == (1, DOWN)


def test_no_scale_down_soon_after_a_scale_event():
    policy = QueueDepth(replace(SPEC, downscale_delay_s=30))
    assert policy.decide(snap(now=100, replicas=2, since=5)).action == HOLD
    assert policy.decide(snap(now=130, replicas=2, since=35)).action == DOWN


def test_registry_and_choice_of_replica_to_retire():
    assert SCALERS == {"queue-depth": QueueDepth}
    assert isinstance(make_scaler(SPEC), QueueDepth)
    views = [ReplicaView("c/decode/0", 0), ReplicaView("c/decode/2", 3),
             ReplicaView("c/decode/10", 0), ReplicaView("c/decode/1", 1)]
    assert pick_to_retire(views, 2) == ["c/decode/10", "c/decode/0"]
    assert pick_to_retire(views, 0) == []


def test_policy_module_needs_no_ray_or_torch():
    import subprocess
    import sys

    code = ("import sys, cluster.policies.scaling; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----- properties ----------------------------------------------------------------
specs = st.builds(
    lambda lo, span, w, kv, step: AutoscaleSpec(
        max_replicas=lo + span, min_replicas=lo, target_waiting_per_replica=w,
        target_kv_usage=kv, upscale_delay_s=0, downscale_delay_s=0, max_step=step),
    st.integers(0, 4), st.integers(0, 6), st.integers(1, 16),
    st.floats(0.3, 1.0), st.integers(1, 3))


@settings(max_examples=300, deadline=None)
@given(spec=specs, waiting=st.integers(0, 500), running=st.integers(0, 400),
       replicas=st.integers(0, 12), pending=st.integers(0, 4), kv=st.floats(0, 1))
def test_any_decision_stays_in_bounds_and_steps(spec, waiting, running, replicas, pending, kv):
    s = snap(waiting, running, replicas, pending, kv)
    d = QueueDepth(spec).decide(s)
    current = replicas + pending
    inside = spec.min_replicas <= current <= spec.max_replicas
    if inside:
        assert spec.min_replicas <= d.desired_replicas <= spec.max_replicas
    assert abs(d.desired_replicas - current) <= spec.max_step
    assert d.action == (UP if d.desired_replicas > current else
                        DOWN if d.desired_replicas < current else HOLD)
    if inside and waiting > 0:
        assert d.action != DOWN  # a queue means the pool is full


@settings(max_examples=200, deadline=None)
@given(spec=specs, demand=st.integers(0, 300), seqs=st.integers(1, 16),
       kv_per_seq=st.floats(0.01, 0.2))
def test_a_steady_load_never_flaps(spec, demand, seqs, kv_per_seq):
    """``demand`` sequences want service for ever; replicas hold ``seqs`` each
    (or fewer when their KV fills up) and new replicas are ready at once. The
    replica count moves one way only and settles."""
    policy = QueueDepth(spec)
    n, history = spec.min_replicas, []
    for t in range(40):
        per_replica = min(seqs, math.floor(1 / kv_per_seq))
        running = min(demand, n * per_replica)
        kv = running * kv_per_seq / n if n else 0.0
        d = policy.decide(snap(demand - running, running, n, 0, kv, seqs, now=float(t), since=9e9))
        n = d.desired_replicas
        history.append(n)
    moves = {(b > a) - (b < a) for a, b in zip(history, history[1:])} - {0}
    assert len(moves) <= 1, history
    assert history[-1] == history[-2]

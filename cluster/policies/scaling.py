"""Scaling: how many replicas an autoscaled pool should have.

Lifecycle: every ``interval_s`` the autoscaler (cluster/autoscaler.py; or the
simulator, with simulated time) reads one ``ScalingSnapshot`` per autoscaled
pool and calls ``policy.decide(snapshot)``; a decision that differs from the
replicas it has (ready + pending) makes it create or retire replicas. The
policy keeps one small memory, since when a scale-up or scale-down has been
wanted, and takes the time from the snapshot (it has no clock of its own).

``queue-depth`` wants, of three signals, the largest (clamped to the pool's
[min_replicas, max_replicas], moving at most ``max_step`` at a time):

    queue     waiting > target_waiting_per_replica x (ready + pending): the
              fewest replicas n that leave at most that many waiting each,
              n = ceil((running + waiting) / (capacity + target)), where a
              replica's capacity is max_num_seqs or what its KV holds at the
              present KV per sequence (at least one more than now); any
              waiting at all keeps the current size (no scale-down)
    KV        ceil(ready x kv_usage / target_kv_usage)
    batch     ceil(running / max_num_seqs): the running sequences must fit

Hysteresis, so that it does not flap:

- a change must have been wanted for ``upscale_delay_s`` (up) or
  ``downscale_delay_s`` (down) without interruption, and as long since the
  last scale event;
- a scale-down goes only to a size that stays ``DOWNSCALE_HEADROOM`` under
  both targets;
- pending replicas (created, not yet placed: their Ray autoscaler pod may be
  starting) count as capacity, so a burst does not order pods twice.

Below ``min_replicas`` or above ``max_replicas`` (a replica died, or the
bounds changed) it corrects at once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from cluster.config import AutoscaleSpec
from cluster.policies.router import decode_fits
from cluster.policies.types import RequestView, WorkerView

DOWNSCALE_HEADROOM = 0.1  # a scale-down must leave the targets 10% of slack (HPA's tolerance)
UP, DOWN, HOLD = "up", "down", "hold"


@dataclass(frozen=True)
class ScalingSnapshot:
    """An autoscaled pool's load at one decision point."""

    pool: str
    now_s: float  # the driver's clock (wall clock, or simulated time)
    waiting: int  # requests queued for this pool that no ready replica can take now
    running: int  # sequences in the decode batches of its ready replicas
    replicas: int  # ready replicas: registered with the controller, not retiring
    pending: int  # replicas created but not yet placed/ready
    kv_usage: float  # fraction of the ready replicas' KV blocks in use (0 when none)
    max_num_seqs: int  # one replica's decode batch cap
    since_last_scale_s: float  # seconds since this pool last scaled (or since start)


@dataclass(frozen=True)
class ScalingDecision:
    pool: str
    desired_replicas: int  # ready + pending the pool should have
    action: str  # up | down | hold
    reason: str  # why, for logs and status


@dataclass(frozen=True)
class ReplicaView:
    """A ready replica, for choosing which to retire."""

    worker_id: str
    running: int  # sequences in its batch


@dataclass(frozen=True)
class PoolLoad:
    """What the controller measures of one pool; the autoscaler adds its
    pending replicas and the time to make a ``ScalingSnapshot``."""

    pool: str
    waiting: int  # queued requests that fit on none of its ready replicas
    running: int  # sequences in (or on their way to) its ready replicas' batches
    kv_usage: float  # fraction of its ready replicas' KV blocks in use
    max_num_seqs: int  # one replica's batch cap (0 when it has none ready)
    replicas: tuple[ReplicaView, ...]  # ready: alive and not retiring
    dead: tuple[str, ...] = ()  # its workers that died and are still registered


def measure_pool(pool: str, ready: Sequence[WorkerView], waiting: Sequence[RequestView],
                 dead: Sequence[str] = ()) -> PoolLoad:
    """A pool's load from its ready workers' views and the controller's queue.
    A queued request counts as waiting for this pool only if none of its
    replicas could take it now (else it waits for something else, e.g. prefill)."""
    stuck = sum(1 for r in waiting if not any(decode_fits(w, r) for w in ready))
    total = sum(w.total_kv_blocks for w in ready)
    used = sum(w.total_kv_blocks - w.free_kv_blocks for w in ready)
    return PoolLoad(pool, stuck, sum(w.running for w in ready), used / total if total else 0.0,
                    max((w.max_num_seqs for w in ready), default=0),
                    tuple(ReplicaView(w.worker_id, w.running) for w in ready), tuple(dead))


class ScalingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def decide(self, snap: ScalingSnapshot) -> ScalingDecision: ...


class QueueDepth(ScalingPolicy):
    name = "queue-depth"

    def __init__(self, spec: AutoscaleSpec):
        self.spec = spec
        self._wanted_since: tuple[str, float] | None = None  # (up | down, first seen at)

    def decide(self, snap: ScalingSnapshot) -> ScalingDecision:
        spec, current = self.spec, snap.replicas + snap.pending
        if current < spec.min_replicas or current > spec.max_replicas:
            self._wanted_since = None
            target = min(max(current, spec.min_replicas), spec.max_replicas)
            return self._step(snap.pool, current, target, "outside [min_replicas, max_replicas]")
        target, why = self.wanted(snap)
        if target < current:  # down only as far as the headroom allows
            target, why = self.wanted(snap, 1 - DOWNSCALE_HEADROOM)
            target = min(target, current)
        if target == current:
            self._wanted_since = None
            return ScalingDecision(snap.pool, current, HOLD, why)
        action = UP if target > current else DOWN
        if self._wanted_since is None or self._wanted_since[0] != action:
            self._wanted_since = (action, snap.now_s)
        delay = spec.upscale_delay_s if action == UP else spec.downscale_delay_s
        held = snap.now_s - self._wanted_since[1]
        if held < delay or snap.since_last_scale_s < delay:
            wait = max(delay - held, delay - snap.since_last_scale_s)
            return ScalingDecision(snap.pool, current, HOLD,
                                   f"{why}; {action} in {wait:.1f} s if still wanted")
        self._wanted_since = None
        return self._step(snap.pool, current, target, why)

    def wanted(self, snap: ScalingSnapshot, slack: float = 1.0) -> tuple[int, str]:
        """Replicas the load asks for (within the bounds), and the deciding signal.
        ``slack`` < 1 shrinks the targets (scale-down headroom)."""
        spec, current = self.spec, snap.replicas + snap.pending
        per_replica = spec.target_waiting_per_replica * slack
        queue = 0
        if snap.waiting > per_replica * current:
            total = snap.running + snap.waiting
            queue = max(current + 1, math.ceil(total / (self._capacity(snap) + per_replica)))
        elif snap.waiting > 0:
            queue = current
        signals = {  # ties go to the first
            "queue": queue,
            "kv": math.ceil(snap.replicas * snap.kv_usage / (spec.target_kv_usage * slack) - 1e-9),
            "batch": math.ceil(snap.running / max(1, snap.max_num_seqs)),
        }
        signal = max(signals, key=lambda k: signals[k])
        target = min(max(signals[signal], spec.min_replicas), spec.max_replicas)
        why = (f"waiting {snap.waiting}, running {snap.running}, kv {snap.kv_usage:.2f} on "
               f"{snap.replicas}+{snap.pending} replicas: {signal} wants {signals[signal]}")
        return target, why

    @staticmethod
    def _capacity(snap: ScalingSnapshot) -> int:
        """Sequences one replica holds: its batch cap, or fewer when KV runs
        out first at the present KV per running sequence."""
        cap = max(1, snap.max_num_seqs)
        if snap.running and snap.replicas and snap.kv_usage > 0:
            per_seq = snap.replicas * snap.kv_usage / snap.running  # share of one replica's KV
            if per_seq * cap > 1:
                cap = max(1, math.floor(1 / per_seq + 1e-9))
        return cap

    def _step(self, pool: str, current: int, target: int, why: str) -> ScalingDecision:
        step = max(-self.spec.max_step, min(self.spec.max_step, target - current))
        if step == 0:
            return ScalingDecision(pool, current, HOLD, why)
        return ScalingDecision(pool, current + step, UP if step > 0 else DOWN, why)


def pick_to_retire(replicas: Sequence[ReplicaView], n: int) -> list[str]:
    """The ``n`` replicas to retire: fewest running sequences first (least to
    drain), the newest (largest worker id suffix) on ties."""
    def key(r: ReplicaView):
        suffix = r.worker_id.rsplit("/", 1)[-1]
        return r.running, -int(suffix) if suffix.isdigit() else 0, r.worker_id
    return [r.worker_id for r in sorted(replicas, key=key)[:max(0, n)]]

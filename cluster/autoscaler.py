"""The autoscaler: Baton sizing its autoscaled pools on queue depth.

KubeRay's RayCluster has no ``scale`` subresource, so neither an HPA nor KEDA
can size a worker group. As Ray Serve does, Baton scales its own replicas and
lets KubeRay's in-tree Ray autoscaler turn their unmet resource demand into
pods. Lifecycle, every ``autoscale.interval_s`` for each autoscaled pool::

    measure   controller.pool_load(pool): requests no replica can take, running
              sequences, KV usage, ready replicas
    decide    the pool's scaling policy (cluster/policies/scaling.py) on that
              load plus the pending replicas and the time since the last event
    up        create worker actors with the pool's placement options
              (``gpu_type:<T>``). One that no node can place stays *pending*:
              that demand makes the Ray autoscaler add a pod to the pool's
              worker group (up to its maxReplicas). Ready (it answers ping) ->
              added to the deployment's worker table and to the controller.
              Still pending after ``pending_timeout_s`` -> killed, given up.
    down      pending replicas are cancelled first; then the ready replicas
              with least to drain are retired (the controller routes them
              nothing new, lets their requests finish for ``drain_timeout_s``,
              re-queues the rest) and killed; the Ray autoscaler removes the
              idle pod after its idleTimeoutSeconds
    dead      workers that died are forgotten and killed (their requests were
              already re-queued), so the policy sees the pool short and refills it

It runs as a thread of the process that owns the ``Deployment`` (``baton
serve`` on the head), not inside the controller, so it survives a controller
restart: the worker table the new controller is built from is changed only
under the deployment's lock (which ``restart_controller`` takes too), and a
call to a controller that went away is logged and asked again next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from cluster.config import PoolSpec
from cluster.policies.registry import make_scaler
from cluster.policies.scaling import (
    PoolLoad,
    ScalingDecision,
    ScalingPolicy,
    ScalingSnapshot,
    pick_to_retire,
)

log = logging.getLogger("baton.autoscaler")
CALL_TIMEOUT_S = 30.0  # for controller calls that should answer at once


@dataclass
class _Pending:
    handle: object  # the worker actor, created but maybe not yet placed
    ready: object  # ObjectRef of its ping: resolves once placed and constructed
    since_s: float


@dataclass
class _Pool:
    spec: PoolSpec
    policy: ScalingPolicy
    next_index: int  # suffix of the next worker id (never reused)
    last_scale_s: float
    due_s: float = 0.0
    pending: dict[str, _Pending] = field(default_factory=dict)
    retiring: dict[str, object] = field(default_factory=dict)  # worker id -> retire ObjectRef
    last: ScalingDecision | None = None


class Autoscaler:
    def __init__(self, deployment, clock: Callable[[], float] = time.monotonic):
        """``deployment``: cluster.launcher.Deployment (its controller, worker
        table, lock and ``create_worker``)."""
        self.dep = deployment
        self.clock = clock
        now = clock()
        self.pools = {p.name: _Pool(p, make_scaler(p.autoscale), p.replicas, now)
                      for p in deployment.config.pools if p.autoscale is not None}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- the loop -------------------------------------------------------------
    def start(self) -> Autoscaler:
        self._thread = threading.Thread(target=self._run, name="baton-autoscaler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for st in self.pools.values():
            for p in st.pending.values():
                ray.kill(p.handle, no_restart=True)
            st.pending.clear()

    def _run(self) -> None:
        pause = min(st.spec.autoscale.interval_s for st in self.pools.values())
        while not self._stop.wait(min(pause, 0.5)):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a failed tick is retried, never fatal
                log.exception("autoscaler tick failed")

    def tick(self) -> list[ScalingDecision]:
        """One round over the pools that are due; returns their decisions."""
        decisions = []
        with self.dep.lock:
            for st in self.pools.values():
                now = self.clock()
                if now >= st.due_s:
                    st.due_s = now + st.spec.autoscale.interval_s
                    decisions.append(self._tick_pool(st, now))
        return decisions

    def status(self) -> dict[str, dict]:
        """Per pool: pending and retiring replicas and the last decision."""
        return {name: {"pending": sorted(st.pending), "retiring": sorted(st.retiring),
                       "last": st.last} for name, st in self.pools.items()}

    # ----- one pool -----------------------------------------------------------------
    def _tick_pool(self, st: _Pool, now: float) -> ScalingDecision | None:
        self._settle(st, now)
        try:
            load: PoolLoad = ray.get(self.dep.controller.pool_load.remote(st.spec.name),
                                     timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("pool %s: controller unavailable (%s); next tick", st.spec.name,
                        type(exc).__name__)
            return None
        for wid in load.dead:
            if wid not in st.retiring:
                self._retire(st, wid)
        ready = [r for r in load.replicas if r.worker_id not in st.retiring]
        snap = ScalingSnapshot(st.spec.name, now, load.waiting, load.running, len(ready),
                               len(st.pending), load.kv_usage,
                               load.max_num_seqs or st.spec.max_num_seqs, now - st.last_scale_s)
        d = st.last = st.policy.decide(snap)
        self.dep.controller.observe_scaling.remote(d, len(ready), len(st.pending))
        delta = d.desired_replicas - snap.replicas - snap.pending
        if delta:
            log.info("pool %s: %s to %d (%s)", st.spec.name, d.action, d.desired_replicas,
                     d.reason)
            st.last_scale_s = now
        for _ in range(delta):
            self._create(st, now)
        if delta < 0:
            for wid in list(st.pending)[::-1][:-delta]:  # cancel the newest pending first
                ray.kill(st.pending.pop(wid).handle, no_restart=True)
                delta += 1
            for wid in pick_to_retire(ready, -delta):
                self._retire(st, wid)
        return d

    def _create(self, st: _Pool, now: float) -> None:
        wid, handle = self.dep.create_worker(st.spec, st.next_index)
        st.next_index += 1
        st.pending[wid] = _Pending(handle, handle.ping.remote(), now)

    def _retire(self, st: _Pool, wid: str) -> None:
        st.retiring[wid] = self.dep.controller.retire_worker.remote(
            wid, st.spec.autoscale.drain_timeout_s)

    def _settle(self, st: _Pool, now: float) -> None:
        """Register replicas that became ready, give up those pending too long,
        kill those the controller has let go."""
        for wid, p in list(st.pending.items()):
            done, _ = ray.wait([p.ready], timeout=0)
            if done:
                del st.pending[wid]
                self._register(st, wid, p)
            elif now - p.since_s > st.spec.autoscale.pending_timeout_s:
                del st.pending[wid]
                ray.kill(p.handle, no_restart=True)
                log.warning("pool %s: replica %s not placed within %.0f s: no node has a free "
                            "gpu_type:%s (is the Ray autoscaler on, and the worker group's "
                            "maxReplicas high enough?)", st.spec.name, wid,
                            st.spec.autoscale.pending_timeout_s, st.spec.gpu_type)
        for wid, ref in list(st.retiring.items()):
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            del st.retiring[wid]
            try:
                moved = ray.get(ref)
            except ray.exceptions.RayError:  # the controller restarted: ask again later
                continue
            log.info("pool %s: retired %s (%d requests moved)", st.spec.name, wid, moved)
            entry = self.dep.workers.pop(wid, None)
            if entry is not None:
                ray.kill(entry[2], no_restart=True)

    def _register(self, st: _Pool, wid: str, p: _Pending) -> None:
        try:
            ray.get(p.ready)
        except ray.exceptions.RayError as exc:
            log.warning("pool %s: replica %s failed to start: %s", st.spec.name, wid, exc)
            ray.kill(p.handle, no_restart=True)
            return
        self.dep.workers[wid] = (st.spec.role, st.spec.gpu_type, p.handle)
        try:  # if the controller is gone, the next one is built from the table above
            ray.get(self.dep.controller.add_worker.remote(
                wid, st.spec.role, st.spec.gpu_type, p.handle), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("pool %s: registering %s failed (%s)", st.spec.name, wid,
                        type(exc).__name__)
        log.info("pool %s: replica %s ready", st.spec.name, wid)

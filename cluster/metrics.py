"""Prometheus metrics of a Baton cluster, in base units.

Lifecycle: the controller builds one ``ServingMetrics`` and calls its
``observe_*`` hooks as requests move (first token, each token, prefill
result, finish). Gauges that describe the cluster right now (running and
waiting requests, KV usage, prefix-cache counters, NVML readings) are not
kept up to date by hand: a collector reads them from the controller's latest
worker loads at scrape time. The autoscaler reports each decision
(``observe_scaling``): desired and ready/pending replicas per pool.
``exposition()`` renders this registry plus the process's default one (where
other modules, e.g. the ranker, register theirs) in the text format that
``GET /metrics`` serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from workers.messages import WorkerLoad
from workers.sequence import FinishReason

# Latency buckets from 1 ms to 5 min: token gaps on GPUs are milliseconds,
# queueing under overload can reach minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ClusterSnapshot:
    """What the scrape-time collector reads; built by the controller."""

    waiting_by_role: dict[str, int]
    workers: list[tuple[str, WorkerLoad]]  # (pool, latest load) of every known worker


class _LiveCollector:
    """Gauges and cumulative worker counters, read at scrape time."""

    def __init__(self, snapshot: Callable[[], ClusterSnapshot]):
        self.snapshot = snapshot

    def describe(self):
        return []  # unchecked: the families depend on the cluster's shape

    def collect(self):
        snap = self.snapshot()
        running = GaugeMetricFamily("baton_num_requests_running",
                                    "Requests running on workers", labels=["role"])
        waiting = GaugeMetricFamily("baton_num_requests_waiting",
                                    "Requests waiting for a worker", labels=["role"])
        usage = GaugeMetricFamily("baton_kv_cache_usage_ratio",
                                  "Fraction of KV cache blocks in use", labels=["pool", "gpu_type"])
        per_role: dict[str, int] = dict.fromkeys(snap.waiting_by_role, 0)
        blocks: dict[tuple[str, str], list[int]] = {}
        for pool, load in snap.workers:
            per_role[load.role] = per_role.get(load.role, 0) + load.running
            used_total = blocks.setdefault((pool, load.gpu_type), [0, 0])
            used_total[0] += load.total_kv_blocks - load.free_kv_blocks
            used_total[1] += load.total_kv_blocks
        for role, n in sorted(per_role.items()):
            running.add_metric([role], n)
        for role, n in sorted(snap.waiting_by_role.items()):
            waiting.add_metric([role], n)
        for (pool, gpu_type), (used, total) in sorted(blocks.items()):
            usage.add_metric([pool, gpu_type], used / total if total else 0.0)
        yield from (running, waiting, usage)
        yield from _prefix_counters(snap)
        yield from _gpu_gauges(snap)


def _prefix_counters(snap: ClusterSnapshot):
    hits = CounterMetricFamily("baton_prefix_cache_hits", "KV blocks found in a prefix cache")
    queries = CounterMetricFamily("baton_prefix_cache_queries",
                                  "KV blocks looked up in a prefix cache")
    hits.add_metric([], sum(load.prefix_cache_hits for _, load in snap.workers))
    queries.add_metric([], sum(load.prefix_cache_queries for _, load in snap.workers))
    return hits, queries


def _gpu_gauges(snap: ClusterSnapshot):
    """NVML readings per GPU type; nothing at all on machines without GPUs."""
    by_type: dict[str, list] = {}
    for _, load in snap.workers:
        if load.gpu is not None:
            by_type.setdefault(load.gpu_type, []).append(load.gpu)
    if not by_type:
        return
    util = GaugeMetricFamily("baton_gpu_utilization_ratio", "Mean GPU utilization",
                             labels=["gpu_type"])
    power = GaugeMetricFamily("baton_gpu_power_watts", "Total GPU power draw",
                              labels=["gpu_type"])
    memory = GaugeMetricFamily("baton_gpu_memory_used_bytes", "Total GPU memory in use",
                               labels=["gpu_type"])
    for gpu_type, stats in sorted(by_type.items()):
        util.add_metric([gpu_type], sum(s.utilization_ratio for s in stats) / len(stats))
        power.add_metric([gpu_type], sum(s.power_watts for s in stats))
        memory.add_metric([gpu_type], sum(s.memory_used_bytes for s in stats))
    yield from (util, power, memory)


class ServingMetrics:
    def __init__(self, transport: str, snapshot: Callable[[], ClusterSnapshot]):
        self.transport = transport
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram("baton_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("baton_inter_token_latency_seconds",
                             "Time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("baton_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("baton_request_queue_time_seconds",
                               "Time a request waited before its work started on a role",
                               ["role"], buckets=LATENCY_BUCKETS, registry=r)
        self.kv_bytes = Counter("baton_kv_transfer_bytes", "KV cache bytes shipped",
                                ["transport"], registry=r)
        self.kv_seconds = Histogram("baton_kv_transfer_duration_seconds",
                                    "Duration of one request's KV transfer", ["transport"],
                                    buckets=TRANSFER_BUCKETS, registry=r)
        self.kv_failures = Counter("baton_kv_transfer_failures",
                                   "KV transfers that failed an attempt", ["transport", "reason"],
                                   registry=r)
        self.success = Counter("baton_request_success", "Requests finished, by finish reason",
                               ["finish_reason"], registry=r)
        self.scaling_decisions = Counter(
            "baton_autoscaler_decisions", "Autoscaler decisions per pool (up, down, hold)",
            ["pool", "action"], registry=r)
        self.desired_replicas = Gauge("baton_pool_desired_replicas",
                                      "Replicas the autoscaler wants for a pool", ["pool"],
                                      registry=r)
        self.pool_replicas = Gauge("baton_pool_replicas",
                                   "Replicas of an autoscaled pool: ready, or pending placement "
                                   "(waiting for a gpu_type resource, e.g. a new pod)",
                                   ["pool", "state"], registry=r)
        # Every known series exists from the start, at zero: a failure counter
        # with no sample until the first failure breaks rate() and alerts.
        self.kv_bytes.labels(transport)
        for reason in ("retried", "recomputed"):
            self.kv_failures.labels(transport, reason)
        for finish in FinishReason:
            self.success.labels(finish.value)
        r.register(_LiveCollector(snapshot))

    def observe_tokens(self, previous_s: float | None, now: float, count: int) -> None:
        """``count`` tokens arrived together at ``now``; ``previous_s``: when
        the request's previous token did (None: these are its first)."""
        if previous_s is not None:
            self.itl.observe(max(0.0, now - previous_s))
        for _ in range(count - 1):  # the rest of a multi-token step: no gap
            self.itl.observe(0.0)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_queue(self, role: str, seconds: float) -> None:
        self.queue.labels(role).observe(max(0.0, seconds))

    def observe_transfer(self, nbytes: int, seconds: float, attempts: int, ok: bool) -> None:
        if attempts == 0:
            return  # nothing was shipped (e.g. colocated, or finished at prefill)
        self.kv_bytes.labels(self.transport).inc(nbytes)
        self.kv_seconds.labels(self.transport).observe(seconds)
        if attempts > 1:
            self.kv_failures.labels(self.transport, "retried").inc(attempts - 1)
        if not ok:
            self.kv_failures.labels(self.transport, "recomputed").inc()

    def observe_finish(self, reason: str, e2e_s: float) -> None:
        self.success.labels(reason).inc()
        self.e2e.observe(e2e_s)

    def observe_scaling(self, pool: str, action: str, desired: int, ready: int,
                        pending: int) -> None:
        self.scaling_decisions.labels(pool, action).inc()
        self.desired_replicas.labels(pool).set(desired)
        self.pool_replicas.labels(pool, "ready").set(ready)
        self.pool_replicas.labels(pool, "pending").set(pending)

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)

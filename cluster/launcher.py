"""Start a Baton cluster on a Ray cluster: worker pools, then the controller.

Lifecycle: ``Deployment(config).start()`` checks that every pool's GPU type is
offered by some node (failing fast with the pool's name otherwise), creates
named worker actors placed by GPU type, waits until each answers, then starts
the controller actor, which connects to them and to Redis; pools with an
``autoscale`` block are then sized by the autoscaler (cluster/autoscaler.py),
a thread of this process that changes the worker table under ``lock``.
``restart_controller`` replaces the controller (it recovers in-flight requests
from Redis, and gets the worker table as it is now); ``shutdown`` stops the
autoscaler and removes every actor.
"""

from __future__ import annotations

import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.autoscaler import Autoscaler
from cluster.config import ClusterConfig, PoolSpec
from cluster.controller import Controller
from workers.decode_worker import DecodeWorker
from workers.gpu import missing_gpu_types, placement_options
from workers.prefill_worker import PrefillWorker
from workers.worker_config import WorkerSpec

NAMESPACE = "baton"


class PlacementError(RuntimeError):
    """A pool cannot be placed on the Ray cluster."""


def controller_name(cluster: str) -> str:
    return f"{cluster}/controller"


def _wait_until_name_free(name: str, timeout_s: float = 30.0) -> None:
    """``ray.kill`` returns before the GCS releases the actor's name; a new
    actor of that name created too soon fails with ActorAlreadyExistsError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"actor name {name!r} still taken {timeout_s} s after its actor was killed")


class Deployment:
    def __init__(self, config: ClusterConfig, torch_threads: int = 1,
                 placement_timeout_s: float = 120.0):
        self.config = config
        self.torch_threads = torch_threads
        self.placement_timeout_s = placement_timeout_s
        self.workers: dict[str, tuple[str, str, object]] = {}  # id -> (role, gpu type, handle)
        self.controller = None
        self.autoscaler: Autoscaler | None = None
        self.lock = threading.RLock()  # held while the worker table or the controller changes

    def start(self) -> Deployment:
        if not ray.is_initialized():
            raise RuntimeError("ray.init() first (or `baton serve`, which does it)")
        self._check_gpu_types()
        for pool in self.config.pools:
            for i in range(pool.replicas):
                self._start_worker(pool, i)
        self._wait_for_workers()
        self.start_controller()
        if any(p.autoscale is not None for p in self.config.pools):
            self.autoscaler = Autoscaler(self).start()
        return self

    def _check_gpu_types(self) -> None:
        resources = ray.cluster_resources()
        for pool in self.config.pools:
            if pool.replicas == 0:
                continue  # nothing to place yet: its first replica's demand brings a node
            if missing_gpu_types([pool.gpu_type], resources):
                offered = sorted(k.split(":", 1)[1] for k in resources if k.startswith("gpu_type:"))
                raise PlacementError(
                    f"pool {pool.name!r} needs GPU type {pool.gpu_type!r}, which no node of the "
                    f"Ray cluster offers (offered: {', '.join(offered) or 'none'})")

    def _spec(self, pool: PoolSpec, i: int) -> WorkerSpec:
        cfg = self.config
        return WorkerSpec(
            worker_id=f"{cfg.name}/{pool.name}/{i}", role=pool.role, pool=pool.name,
            gpu_type=pool.gpu_type, model=cfg.model.source, dtype=cfg.model.dtype,
            max_model_len=cfg.model.max_model_len, block_size=pool.block_size,
            kv_cache_bytes=pool.kv_cache_bytes, max_num_seqs=pool.max_num_seqs,
            max_num_batched_tokens=pool.max_num_batched_tokens,
            prefill_chunk_size=pool.prefill_chunk_size, transport=cfg.transport,
            device="cuda" if pool.gpus_per_replica > 0 else "cpu",
            torch_threads=self.torch_threads, cpu_kernels=pool.cpu_kernels is not False,
            redis_url=cfg.redis.url,
            namespace=cfg.redis.namespace, redis_password_env=cfg.redis.password_env)

    def _start_worker(self, pool: PoolSpec, i: int) -> None:
        worker_id, handle = self.create_worker(pool, i)
        self.workers[worker_id] = (pool.role, pool.gpu_type, handle)

    def create_worker(self, pool: PoolSpec, i: int) -> tuple[str, object]:
        """Worker ``i`` of a pool, placed on its GPU type (pending until a node
        with a free ``gpu_type:<T>`` resource has it); not yet in the table."""
        spec = self._spec(pool, i)
        cls = PrefillWorker if pool.role == "prefill" else DecodeWorker
        handle = ray.remote(cls).options(
            name=spec.worker_id, namespace=NAMESPACE, max_concurrency=1000,
            **placement_options(pool.gpu_type, pool.gpus_per_replica)).remote(spec)
        return spec.worker_id, handle

    def _wait_for_workers(self) -> None:
        refs = {h.ping.remote(): wid for wid, (_, _, h) in self.workers.items()}
        ready, pending = ray.wait(list(refs), num_returns=len(refs),
                                  timeout=self.placement_timeout_s)
        if pending:
            names = sorted(refs[r] for r in pending)
            raise PlacementError(f"workers not placed within {self.placement_timeout_s} s "
                                 f"(not enough gpu_type resources?): {', '.join(names)}")
        ray.get(ready)

    def start_controller(self) -> None:
        # On the driver's node: the frontends listen there (the head pod, where
        # the API Service and the token Secret are), not on some GPU worker.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.controller = ray.remote(Controller).options(
            name=controller_name(self.config.name), namespace=NAMESPACE, num_cpus=0,
            max_concurrency=1000, scheduling_strategy=here).remote(self.config, self.workers)
        ray.get(self.controller.start.remote())

    def restart_controller(self) -> None:
        with self.lock:
            ray.kill(self.controller, no_restart=True)
            _wait_until_name_free(controller_name(self.config.name))
            self.start_controller()

    def kill_worker(self, worker_id: str) -> None:
        ray.kill(self.workers[worker_id][2], no_restart=True)

    def shutdown(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()
            self.autoscaler = None
        for _, _, handle in self.workers.values():
            ray.kill(handle, no_restart=True)
        if self.controller is not None:
            ray.kill(self.controller, no_restart=True)
        self.workers.clear()
        self.controller = None

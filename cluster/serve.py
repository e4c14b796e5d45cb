"""``baton serve``: run a cluster and its frontends until SIGTERM.

Lifecycle: load the config (default: the embedded tiny disaggregated
cluster) -> make sure Redis answers (start a local ``redis-server`` when the
configured one is the local default and nothing listens) -> join or start
Ray (a local Ray offers the emulated GPU types the pools name) -> start the
deployment and the gRPC and HTTP frontends inside the controller -> on SIGTERM/SIGINT
drain, let in-flight streams finish, and shut down.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace

import redis

from cluster.config import ClusterConfig, load_config
from cluster.state import password_from_env


def _redis_reachable(url: str, password: str | None = None) -> bool:
    try:
        return bool(redis.from_url(url, password=password, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _ensure_redis(cfg: ClusterConfig):
    if _redis_reachable(cfg.redis.url, password_from_env(cfg.redis.password_env)):
        return cfg, None
    if not cfg.redis.url.startswith("redis://127.0.0.1"):
        raise SystemExit(f"Redis at {cfg.redis.url} does not answer")
    from cluster.redis_server import RedisServer

    server = RedisServer().start()
    return replace(cfg, redis=replace(cfg.redis, url=server.url)), server


def _init_ray(cfg: ClusterConfig, address: str | None) -> None:
    import ray

    if address:
        ray.init(address=address, namespace="baton", log_to_driver=False)
        return
    types = {p.gpu_type: 0 for p in cfg.pools}
    for p in cfg.pools:  # an autoscaled pool may grow to its max_replicas
        types[p.gpu_type] += p.autoscale.max_replicas if p.autoscale else p.replicas
    # address="local": a fresh local Ray even when another cluster runs on this machine.
    ray.init(address="local", resources={f"gpu_type:{t}": n for t, n in types.items()},
             include_dashboard=False, log_to_driver=False)


def serve(config: str | None, grpc_port: int | None, ray_address: str | None,
          grace_s: float = 30.0, out=sys.stdout, http_port: int | None = None) -> int:
    import ray

    from cluster.launcher import Deployment

    cfg = load_config(config or "tiny-disagg")
    ports = {k: v for k, v in (("grpc_port", grpc_port), ("http_port", http_port))
             if v is not None}
    cfg = replace(cfg, server=replace(cfg.server, **ports))
    cfg, local_redis = _ensure_redis(cfg)
    _init_ray(cfg, ray_address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dep = Deployment(cfg).start()
    try:
        ports = ray.get(dep.controller.start_frontends.remote())
        print(f"baton: serving {cfg.name} ({cfg.model.source}) on gRPC port "
              f"{ports['grpc_port']} and HTTP port {ports['http_port']}; "
              f"auth {'on' if cfg.server.auth_token_env else 'off'}", file=out, flush=True)
        stop.wait()
        print("baton: draining", file=out, flush=True)
        ray.get(dep.controller.stop_frontends.remote(grace_s))
    finally:
        dep.shutdown()
        ray.shutdown()
        if local_redis is not None:
            local_redis.stop()
    return 0

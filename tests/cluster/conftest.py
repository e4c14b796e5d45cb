"""A multi-node local Ray cluster shared by the cluster tests.

Three raylets on this machine: a head with the CPUs, one node offering the
emulated GPU type H100 and one offering L40S, so placement by GPU type is
exercised for real.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray")

GPU_NODES = {"H100": 8, "L40S": 8}
# Exported before Ray starts so every Ray process inherits it, as a pod's
# Secret-backed environment reaches the head node in production.
AUTH_TOKEN_ENV, AUTH_TOKEN = "BATON_TEST_API_TOKEN", "s3cret-test-token"
os.environ[AUTH_TOKEN_ENV] = AUTH_TOKEN


@pytest.fixture(scope="session")
def ray_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = {t: cluster.add_node(num_cpus=0, resources={f"gpu_type:{t}": n})
             for t, n in GPU_NODES.items()}
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, {t: node.node_id for t, node in nodes.items()}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def deploy(ray_cluster, redis_server):
    """Start a deployment of an example config with overrides; shut it down after."""
    from cluster.config import load_config
    from cluster.launcher import Deployment

    started = []

    def start(example: str, pool_overrides: dict | None = None, **overrides):
        cfg = load_config(example)
        pools = tuple(replace(p, **(pool_overrides or {}).get(p.name, {})) for p in cfg.pools)
        cfg = replace(cfg, pools=pools)
        ns = f"{example}-{random.randrange(1 << 30)}"
        cfg = replace(cfg, name=ns, redis=replace(cfg.redis, url=redis_server.url, namespace=ns),
                      **overrides)
        dep = Deployment(cfg).start()
        started.append(dep)
        return dep

    yield start
    for dep in started:
        dep.shutdown()

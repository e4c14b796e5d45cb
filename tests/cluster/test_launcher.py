"""Cluster config -> the WorkerSpec each replica is started with (no Ray needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from cluster.config import ClusterConfig  # noqa: E402
from cluster.launcher import Deployment  # noqa: E402


def test_worker_specs_carry_each_pools_settings():
    cfg = ClusterConfig.from_dict({"name": "c", "pools": [
        {"name": "prefill", "role": "prefill", "gpu_type": "H100", "replicas": 2,
         "block_size": 32, "kv_cache_bytes": "64MiB", "prefill_chunk_size": 256,
         "cpu_kernels": True},
        {"name": "decode", "role": "decode", "gpu_type": "L40S", "max_num_seqs": 8},
        {"name": "torch", "role": "decode", "gpu_type": "L40S", "cpu_kernels": False}]})
    deployment = Deployment(cfg, torch_threads=2)
    specs = [deployment._spec(pool, i) for pool in cfg.pools for i in range(pool.replicas)]
    assert [(s.worker_id, s.role, s.gpu_type, s.block_size, s.kv_cache_bytes,
             s.prefill_chunk_size, s.max_num_seqs, s.torch_threads, s.cpu_kernels)
            for s in specs] == [
        ("c/prefill/0", "prefill", "H100", 32, 64 << 20, 256, 64, 2, True),
        ("c/prefill/1", "prefill", "H100", 32, 64 << 20, 256, 64, 2, True),
        ("c/decode/0", "decode", "L40S", 16, 256 << 20, 512, 8, 2, True),  # unset: on
        ("c/torch/0", "decode", "L40S", 16, 256 << 20, 512, 64, 2, False)]

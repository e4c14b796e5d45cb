"""Fixtures of the simulator tests: small clusters, CPU only, deterministic."""

from __future__ import annotations

import pytest

from sim.spec import PoolFlags, cluster_config_from_flags, spec_from_cluster_config


@pytest.fixture
def make_spec():
    """A ``SimSpec`` from flags: ``make_spec("colocated", gpu="L4", replicas=2, ...)``."""

    def build(mode="colocated", gpu="L4", replicas=1, prefill=1, decode=1, model="llama-3.1-8b",
              scheduler="fcfs", router="least-loaded", batch=None, **options):
        batch = batch or {"max_num_seqs": 64, "max_num_batched_tokens": 2048,
                          "prefill_chunk_size": 512}
        cfg = cluster_config_from_flags(model, "bf16", mode, PoolFlags(gpu, 1, replicas),
                                        PoolFlags(gpu, 1, prefill), PoolFlags(gpu, 1, decode),
                                        scheduler, router, **batch)
        return spec_from_cluster_config(cfg, dtype="bf16", **options)

    return build

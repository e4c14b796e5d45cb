"""WorkerSpec -> the engine a worker builds: every pool setting reaches EngineConfig."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from workers.engine import EngineConfig
from workers.worker_config import WorkerSpec, build_engine

SPEC = WorkerSpec(worker_id="t/mixed/0", role="mixed", pool="mixed", gpu_type="H100",
                  model="tiny", dtype="float32", max_model_len=256, block_size=8,
                  kv_cache_bytes=4 << 20, max_num_seqs=4, max_num_batched_tokens=128,
                  prefill_chunk_size=64, transport="local", torch_threads=1)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """build_engine sets torch's thread count for the whole process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_kernel():
    from kernels import cpu_kernels

    if not cpu_kernels.load():
        pytest.skip("the C++ CPU kernels cannot be built here")


def test_engine_config_is_the_specs_pool_settings():
    engine = build_engine(SPEC)
    assert engine.config == EngineConfig(
        model="tiny", dtype="float32", block_size=8, kv_cache_bytes=4 << 20, max_num_seqs=4,
        max_num_batched_tokens=128, prefill_chunk_size=64, max_model_len=256, num_threads=1,
        cpu_kernels=True)


def test_cpu_kernels_reach_the_engine(cpu_kernel):
    engine = build_engine(SPEC)  # on by default
    assert engine.runner.cpu_kernels is True and engine.runner.decode_buffer is None
    engine = build_engine(replace(SPEC, cpu_kernels=False))
    assert engine.config.cpu_kernels is False
    assert engine.runner.cpu_kernels is False and engine.runner.decode_buffer is not None

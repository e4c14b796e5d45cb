"""What one worker actor is: its identity, its pool's settings, its engine.

Lifecycle: the launcher builds a ``WorkerSpec`` per replica from the cluster
config and passes it to the actor's constructor, which calls
``build_engine``. Plain data, so it crosses the Ray boundary as is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from workers.block_manager import BlockManager
from workers.engine import EngineConfig, LLMEngine
from workers.gpu import GPUStats, gpu_stats
from workers.messages import WorkerLoad


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str  # unique in the cluster, e.g. "tiny-disagg/decode/0"
    role: str  # prefill | decode | mixed
    pool: str
    gpu_type: str
    model: str  # preset name or HF directory
    dtype: str
    max_model_len: int | None
    block_size: int
    kv_cache_bytes: int
    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_chunk_size: int
    transport: str  # grpc | nccl (| local in-process tests)
    device: str = "cpu"
    torch_threads: int = 1  # intra-op threads; CPU workers share few cores
    cpu_kernels: bool = True  # the pool's C++ CPU kernels (EngineConfig.cpu_kernels)
    lease_s: float = 30.0  # a KV reservation never used is released after this
    redis_url: str | None = None  # registry and heartbeats; None = no registration
    namespace: str = "baton"  # the cluster's Redis key prefix
    redis_password_env: str | None = None  # variable holding the Redis password (read here)

    def load(self, queued_prefill_tokens: int, running: int, blocks: BlockManager) -> WorkerLoad:
        gpu = _sampled_gpu_stats() if self.device != "cpu" else None
        return WorkerLoad(self.worker_id, self.role, self.gpu_type, queued_prefill_tokens,
                          running, blocks.num_free_blocks, blocks.num_blocks, self.block_size,
                          self.max_num_batched_tokens, self.max_num_seqs,
                          gpu.name if gpu else f"emulated:{self.gpu_type}",
                          blocks.prefix_queries, blocks.prefix_hits, gpu)


_gpu_sample: tuple[float, GPUStats | None] = (-1.0, None)


def _sampled_gpu_stats(max_age_s: float = 1.0) -> GPUStats | None:
    """NVML at most once a second: loads are read on every token poll."""
    global _gpu_sample
    taken, stats = _gpu_sample
    if time.monotonic() - taken > max_age_s:
        _gpu_sample = (time.monotonic(), gpu_stats())
    return _gpu_sample[1]


def start_heartbeat(spec: WorkerSpec, **info):
    """Register the worker in Redis and keep its heartbeat fresh (if configured)."""
    if spec.redis_url is None:
        return None
    from cluster.state import Heartbeat, password_from_env

    return Heartbeat(spec.redis_url, spec.namespace, spec.worker_id,
                     {"role": spec.role, "pool": spec.pool, "gpu_type": spec.gpu_type, **info},
                     password=password_from_env(spec.redis_password_env))


def build_engine(spec: WorkerSpec) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=spec.model, dtype=spec.dtype, block_size=spec.block_size,
        kv_cache_bytes=spec.kv_cache_bytes, max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        prefill_chunk_size=spec.prefill_chunk_size, max_model_len=spec.max_model_len,
        num_threads=spec.torch_threads, cpu_kernels=spec.cpu_kernels, device=spec.device))


def model_info(engine: LLMEngine) -> dict:
    """What the controller validates requests against."""
    return {"max_model_len": engine.max_model_len,
            "vocab_size": engine.model_config.vocab_size,
            "eos_token_ids": list(engine.tokenizer.eos_token_ids)}

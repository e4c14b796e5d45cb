"""Workload and reference helpers for the cluster tests."""

from __future__ import annotations

import asyncio
import random

from cluster.ray_client import ClusterClient
from workers.engine import EngineConfig, LLMEngine
from workers.sampling import SamplingParams


def mixed_prompts(n: int, seed: int = 0, low: int = 1, high: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(low, high))] for _ in range(n)]


def reference(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """The in-process engine's output for the same prompts (the oracle)."""
    return [c.token_ids for c in LLMEngine(EngineConfig()).generate(prompts, params)]


async def run_all(cluster_name: str, prompts, params, on_chunk=None) -> list[list[int]]:
    client = ClusterClient(cluster_name)

    async def one(i, p):
        tokens = []
        async for chunk in client.generate(p, params, request_id=f"r{i}"):
            tokens += chunk.token_ids
            if on_chunk is not None:
                await on_chunk(i, chunk)
        return tokens

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

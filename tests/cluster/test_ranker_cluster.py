"""The ranker inside a real cluster (local Ray + Redis): requests are scored
on arrival in batches, served token-exact under ``ltr``, logged (features
only) for retraining, and a head hot-swapped mid-flight drops no request."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import ray
import redis
from helpers import reference

from cluster.config import RankerSpec, SchedulerSpec
from cluster.ranker.ranker import DEFAULT_HEAD
from cluster.ray_client import ClusterClient
from workers.sampling import SamplingParams

PARAMS = [SamplingParams(temperature=0, max_tokens=4 + i % 9, ignore_eos=True) for i in range(24)]
TEXTS = [f"Question {i}: " + ("explain in detail " * (i % 5)) + "why is the sky blue?"
         for i in range(24)]


@pytest.mark.slow
def test_ltr_cluster_scores_logs_and_hot_swaps_without_dropping(deploy, redis_server):
    prompts = [[256, *t.encode()] for t in TEXTS]  # byte tokenizer: BOS + UTF-8
    ref = reference(prompts, PARAMS)
    dep = deploy("tiny-colocated", scheduler=SchedulerSpec(policy="ltr"),
                 ranker=RankerSpec(log_completions=True, log_prompts="features"))
    client = ClusterClient(dep.config.name)

    async def one(i: int) -> list[int]:
        tokens = []
        async for chunk in client.generate(prompts[i], PARAMS[i], request_id=f"r{i}"):
            tokens += chunk.token_ids
        return tokens

    async def swap_midway() -> dict:
        ctl = await client.controller()
        await asyncio.sleep(0.3)
        return await ctl.swap_ranker.remote(DEFAULT_HEAD.read_bytes())

    async def run():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))), swap_midway())

    *outs, swapped = asyncio.run(run())
    assert outs == ref
    assert swapped["head_path"].endswith("bytes>")
    key = f"{dep.config.redis.namespace}:ranker:completions"
    r = redis.from_url(redis_server.url, decode_responses=True)
    deadline = time.monotonic() + 60  # a short request may finish before its score is ready
    while r.llen(key) < len(prompts) and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = [json.loads(x) for x in r.lrange(key, 0, -1)]
    r.close()
    report = ray.get(dep.controller.ranker_report.remote())
    assert report["prompts"] == len(prompts) and report["failures"] == 0
    assert report["batches"] < len(prompts)  # arrivals of one moment share an encoder call
    assert report["online_tau"] is not None
    assert len(rows) == len(prompts)
    assert all(set(row) == {"id", "output_tokens", "score", "features"} for row in rows)
    assert sorted(row["output_tokens"] for row in rows) == sorted(p.max_tokens for p in PARAMS)


def test_ranker_is_not_loaded_for_fcfs(deploy):
    dep = deploy("tiny-colocated")
    assert ray.get(dep.controller.ranker_report.remote()) is None

"""The decode pool scales on queue depth on a real local Ray cluster: a burst
adds a replica that then serves requests, idleness retires it, and no request
is lost or changed on the way; a retired worker's requests move elsewhere."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import ray
import redis
from helpers import mixed_prompts, reference

from cluster.config import AutoscaleSpec
from cluster.ray_client import ClusterClient
from workers.sampling import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = mixed_prompts(10, seed=21, low=8, high=80)
FAST = AutoscaleSpec(max_replicas=2, min_replicas=1, target_waiting_per_replica=1,
                     upscale_delay_s=0, downscale_delay_s=1.0, interval_s=0.2,
                     pending_timeout_s=30, drain_timeout_s=10)


@pytest.fixture(scope="module")
def reference_tokens():
    return reference(PROMPTS, PARAMS)


def _decode_workers(dep) -> list[str]:
    status = ray.get(dep.controller.status.remote())
    return sorted(w["worker_id"] for w in status["workers"] if w["role"] == "decode" and w["alive"])


async def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def test_burst_scales_decode_up_and_idle_scales_it_back(deploy, reference_tokens):
    dep = deploy("tiny-disagg", pool_overrides={"decode": {"max_num_seqs": 2, "autoscale": FAST}})
    name, ns = dep.config.name, dep.config.redis.namespace
    new = f"{name}/decode/1"
    journal = redis.Redis.from_url(dep.config.redis.url, decode_responses=True)
    client = ClusterClient(name)
    done: dict[str, tuple[int, list[int]]] = {}  # request id -> (prompt index, tokens)
    ids = itertools.count()
    stop = asyncio.Event()

    async def user():  # closed loop: 6 users on 2 batch slots keep a queue
        while not stop.is_set():
            i = next(ids)
            tokens = [t async for c in client.generate(PROMPTS[i % len(PROMPTS)], PARAMS,
                                                       request_id=f"a{i}") for t in c.token_ids]
            done[f"a{i}"] = (i % len(PROMPTS), tokens)

    def served_by_new() -> bool:  # runs in a thread while users add to ``done``: copy first
        return any(journal.hget(f"{ns}:req:{rid}", "decode_worker") == new for rid in list(done))

    async def scenario():
        users = [asyncio.create_task(user()) for _ in range(6)]
        await _wait_for(lambda: _decode_workers(dep) == sorted([f"{name}/decode/0", new]),
                        90, "a second decode replica")  # generous: CI cores are shared
        await _wait_for(served_by_new, 60, "a request served by the new replica")
        stop.set()
        await asyncio.gather(*users)
        await _wait_for(lambda: len(_decode_workers(dep)) == 1 and len(dep.workers) == 2, 60,
                        "scale-down to one replica, its actor killed")

    asyncio.run(scenario())
    assert len(done) >= 6
    (retired,) = {f"{name}/decode/0", new} - set(_decode_workers(dep))
    assert retired not in dep.workers
    with pytest.raises(ValueError, match="Failed to look up actor"):  # killed
        ray.get_actor(retired, namespace="baton")
    for _, (i, tokens) in sorted(done.items()):
        assert tokens == reference_tokens[i]
    metrics = ray.get(dep.controller.metrics_text.remote()).decode()
    assert 'baton_pool_desired_replicas{pool="decode"} 1.0' in metrics
    assert 'baton_autoscaler_decisions_total{action="up",pool="decode"}' in metrics
    assert 'baton_autoscaler_decisions_total{action="down",pool="decode"}' in metrics


def test_retired_worker_hands_its_requests_on(deploy, reference_tokens):
    dep = deploy("tiny-2p2d")
    victim = f"{dep.config.name}/decode/0"
    client = ClusterClient(dep.config.name)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ref = reference(PROMPTS[:6], params)
    seen = {"tokens": 0, "moved": None}

    async def one(i):
        tokens = []
        async for chunk in client.generate(PROMPTS[i], params, request_id=f"m{i}"):
            tokens += chunk.token_ids
            seen["tokens"] += len(chunk.token_ids)
            if seen["moved"] is None and seen["tokens"] >= 40:
                seen["moved"] = -1
                # no drain time: whatever runs there now is re-queued at once
                seen["moved"] = await dep.controller.retire_worker.remote(victim, 0.0)
        return tokens

    async def run():
        return await asyncio.gather(*(one(i) for i in range(6)))

    out = asyncio.run(run())
    assert seen["moved"] > 0
    assert out == ref
    assert victim not in _decode_workers(dep)

"""Token paths of a real deployment: decode workers' events reach the
controller through Redis (not a Ray item per step) and driver clients get
tokens through their request's output channel; lost messages on either
channel cost latency, never a token."""

from __future__ import annotations

import asyncio
import sys

import ray
from helpers import mixed_prompts, reference, run_all

from cluster.ray_client import ClusterClient
from workers.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _decode(dep):
    return next(h for role, _, h in dep.workers.values() if role == "decode")


def _in_actor(fn):
    """``fn`` pickled by value (actors cannot import this test module)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return fn


def _drop_every_third_publish(worker) -> None:  # runs inside the decode worker
    pub, original, count = worker._publisher, worker._publisher.publish, [0]

    def publish(payload: str) -> bool:
        count[0] += 1
        return True if count[0] % 3 == 0 else original(payload)  # "sent", never arrives
    pub.publish = publish


def _publish_no_tokens(controller) -> None:  # runs inside the controller
    controller._publish_tokens = lambda req, start, now: None


def test_events_and_tokens_take_the_redis_channels(deploy):
    dep = deploy("tiny-disagg")
    status = ray.get(dep.controller.status.remote())
    assert {w["role"]: w["events_via"] for w in status["workers"]} == {
        "prefill": None, "decode": "redis"}
    assert ray.get(dep.controller.token_channel.remote())["namespace"] == dep.config.name
    prompts = mixed_prompts(6, seed=31, low=5, high=60)
    ref = reference(prompts, GREEDY)
    assert asyncio.run(run_all(dep.config.name, prompts, GREEDY)) == ref

    async def through_ray_only(i: int, prompt: list[int]) -> list[int]:
        client = ClusterClient(dep.config.name, token_channel=False)
        return [t async for chunk in client.generate(prompt, GREEDY, f"ray-{i}")
                for t in chunk.token_ids]

    async def all_through_ray():
        return await asyncio.gather(*(through_ray_only(i, p) for i, p in enumerate(prompts)))
    assert asyncio.run(all_through_ray()) == ref


def test_lost_event_messages_are_fetched_from_the_worker(deploy):
    dep = deploy("tiny-disagg")
    ray.get(_decode(dep).__ray_call__.remote(_in_actor(_drop_every_third_publish)))
    prompts = mixed_prompts(4, seed=32, low=5, high=60)
    assert asyncio.run(run_all(dep.config.name, prompts, GREEDY)) == reference(prompts, GREEDY)


def test_client_gets_every_token_when_its_channel_stays_silent(deploy):
    dep = deploy("tiny-disagg")
    ray.get(dep.controller.__ray_call__.remote(_in_actor(_publish_no_tokens)))
    prompts = mixed_prompts(2, seed=33, low=5, high=60)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert asyncio.run(run_all(dep.config.name, prompts, params)) == reference(prompts, params)

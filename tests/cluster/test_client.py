"""The Python client (sync and asyncio) against a served cluster with bearer
auth; drain turns health to NOT_SERVING and refuses new work."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import ray
from conftest import AUTH_TOKEN, AUTH_TOKEN_ENV
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import AsyncBatonClient, BatonClient, Completion, Delta
from workers.engine import EngineConfig, LLMEngine
from workers.sampling import SamplingParams


@pytest.fixture(scope="module")
def address(ray_cluster, redis_server):
    from dataclasses import replace

    from cluster.config import load_config
    from cluster.launcher import Deployment

    cfg = load_config("tiny-colocated")
    cfg = replace(cfg, name="client-t",
                  redis=replace(cfg.redis, url=redis_server.url, namespace="client-t"),
                  server=replace(cfg.server, auth_token_env=AUTH_TOKEN_ENV))
    dep = Deployment(cfg).start()
    port = ray.get(dep.controller.start_frontends.remote(0, 0))["grpc_port"]
    yield f"127.0.0.1:{port}", dep
    dep.shutdown()


def engine_text(prompt: str, n: int):
    out = LLMEngine(EngineConfig()).generate([prompt], SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True))[0]
    return out.token_ids, out.text


def test_sync_generate_and_stream_match_the_engine(address):
    addr, _ = address
    ref_ids, ref_text = engine_text("a client test", 10)
    with BatonClient(addr, token=AUTH_TOKEN) as client:
        done = client.generate("a client test", max_tokens=10, temperature=0, ignore_eos=True)
        assert isinstance(done, Completion) and done.token_ids == ref_ids
        assert done.text == ref_text and done.finish_reason == "length"
        items = list(client.stream("a client test", max_tokens=10, temperature=0,
                                   ignore_eos=True))
        deltas = [i for i in items if isinstance(i, Delta)]
        assert [t for d in deltas for t in d.token_ids] == ref_ids and len(deltas) >= 2
        assert isinstance(items[-1], Completion)


def test_async_client(address):
    addr, _ = address
    ref_ids, _ = engine_text("async", 6)

    async def go():
        client = AsyncBatonClient(addr, token=AUTH_TOKEN)
        done = await client.generate("async", max_tokens=6, temperature=0, ignore_eos=True)
        status = await client.status()
        await client.close()
        return done, status
    done, status = asyncio.run(go())
    assert done.token_ids == ref_ids
    assert status.cluster == "client-t" and [w.role for w in status.workers] == ["mixed"]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_unauthenticated(address, token):
    addr, _ = address
    with BatonClient(addr, token=token) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("x", max_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token,code", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                        (AUTH_TOKEN, grpc.StatusCode.INVALID_ARGUMENT)])
def test_a_request_that_does_not_parse_is_refused_after_auth(address, token, code):
    from proto.baton.v1 import serving_pb2 as pb

    addr, _ = address
    raw = pb.GenerateRequest(text="QQ").SerializeToString().replace(b"QQ", b"\xff\xfe")
    with grpc.insecure_channel(addr) as channel:
        call = channel.unary_stream("/baton.v1.GenerationService/Generate",
                                    response_deserializer=pb.GenerateResponse.FromString)
        md = (("authorization", f"Bearer {token}"),) if token else None
        with pytest.raises(grpc.RpcError) as err:
            list(call(raw, timeout=30, metadata=md))
    assert err.value.code() == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert err.value.details() == "text: not valid UTF-8"


def test_drain_refuses_new_work_and_reports_not_serving(address):
    addr, dep = address
    with BatonClient(addr, token=AUTH_TOKEN) as client:
        assert client.drain() == 0
        channel = grpc.insecure_channel(addr)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            BatonClient(addr, token=AUTH_TOKEN, retry=None).generate("x", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()

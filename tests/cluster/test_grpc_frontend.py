"""The gRPC frontend over loopback with the generated stubs: token-exact
output, status codes for bad input, deadlines, cancellation, health."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import mixed_prompts, reference

from proto.baton.v1 import serving_pb2 as pb
from proto.baton.v1 import serving_pb2_grpc as pb_grpc
from workers.sampling import SamplingParams


@pytest.fixture(scope="module")
def served(ray_cluster, redis_server):
    from dataclasses import replace

    from cluster.config import load_config
    from cluster.launcher import Deployment

    cfg = load_config("tiny-disagg")
    cfg = replace(cfg, name="grpc-fe", redis=replace(cfg.redis, url=redis_server.url,
                                                     namespace="grpc-fe"))
    dep = Deployment(cfg).start()
    port = ray.get(dep.controller.start_frontends.remote(0, 0))["grpc_port"]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield dep, channel
    channel.close()
    dep.shutdown()


def generate(channel, **kw):
    stub = pb_grpc.GenerationServiceStub(channel)
    timeout = kw.pop("timeout", 60)
    return list(stub.Generate(pb.GenerateRequest(**kw), timeout=timeout))


def wait_blocks(decode, free: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while ray.get(decode.free_blocks.remote()) != free and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray.get(decode.free_blocks.remote())


def test_stream_equals_in_process_engine(served):
    _, channel = served
    prompts = mixed_prompts(3, seed=21, low=5, high=80)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for prompt, ref in zip(prompts, reference(prompts, params)):
        msgs = generate(channel, token_ids=pb.TokenIds(ids=prompt), stream=True,
                        sampling=pb.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        tokens = [t for m in msgs if m.WhichOneof("kind") == "chunk" for t in m.chunk.token_ids]
        final = msgs[-1].final
        assert tokens == ref
        assert final.finish_reason == pb.FINISH_REASON_LENGTH
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), 12)
        assert final.timing.ttft_s > 0 and final.timing.total_s >= final.timing.ttft_s


def test_non_streaming_sends_one_chunk_then_final_with_the_engines_text(served):
    from workers.engine import EngineConfig, LLMEngine

    _, channel = served
    ref = LLMEngine(EngineConfig()).generate(["hello there"], SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True))[0]
    msgs = generate(channel, text="hello there", stream=False,
                    sampling=pb.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [m.WhichOneof("kind") for m in msgs] == ["chunk", "final"]
    assert list(msgs[0].chunk.token_ids) == ref.token_ids
    assert msgs[0].chunk.text == ref.text  # text deltas survive the prefill -> decode hand-off


@pytest.mark.parametrize("kwargs,field", [
    ({"text": ""}, "prompt"),
    ({"token_ids": pb.TokenIds(ids=[5, 400])}, "prompt"),
    ({"text": "x", "sampling": pb.SamplingParams(max_tokens=-2)}, "max_tokens"),
    ({"text": "x", "sampling": pb.SamplingParams(max_tokens=100000)}, "max_tokens"),
    ({"text": "x", "sampling": pb.SamplingParams(temperature=-1)}, "temperature"),
    ({"text": "x", "sampling": pb.SamplingParams(top_p=1.5)}, "top_p"),
    ({"text": "x", "model": "gpt-4"}, "model"),
    ({}, "input"),
])
def test_bad_input_is_invalid_argument_naming_the_field(served, kwargs, field):
    dep, channel = served
    decode = dep.workers["grpc-fe/decode/0"][2]
    free = ray.get(decode.free_blocks.remote())
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")
    assert ray.get(decode.free_blocks.remote()) == free


def test_deadline_ends_the_request_and_frees_blocks(served):
    dep, channel = served
    decode = dep.workers["grpc-fe/decode/0"][2]
    free = ray.get(decode.free_blocks.remote())
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, text="long", timeout=0.05, stream=True, request_id="deadline",
                 sampling=pb.SamplingParams(max_tokens=1500, ignore_eos=True))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_blocks(decode, free) == free
    done = ray.get(dep.controller.stream.remote("deadline", 0, 1.0))
    assert (done.finish_reason, len(done.token_ids) < 1500) == ("abort", True)


def test_cancel_is_idempotent_and_health_serves(served):
    _, channel = served
    stub = pb_grpc.GenerationServiceStub(channel)
    assert stub.Cancel(pb.CancelRequest(request_id="never-seen")).cancelled is False
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="baton.v1.GenerationService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.id, m.max_model_len, m.vocab_size) for m in models] == [("tiny", 2048, 320)]


def test_oversized_message_is_resource_exhausted_and_the_server_keeps_serving(served):
    dep, channel = served
    decode = dep.workers["grpc-fe/decode/0"][2]
    free = ray.get(decode.free_blocks.remote())
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, text="y" * (17 << 20))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ray.get(decode.free_blocks.remote()) == free
    assert generate(channel, text="still here", sampling=pb.SamplingParams(max_tokens=2))


def test_invalid_utf8_is_invalid_argument_naming_the_field(served):
    dep, channel = served
    decode = dep.workers["grpc-fe/decode/0"][2]
    free = ray.get(decode.free_blocks.remote())
    wire = pb.GenerateRequest(text="AB", sampling=pb.SamplingParams(max_tokens=2))
    raw = wire.SerializeToString().replace(b"AB", b"\xff\xfe")
    call = channel.unary_stream("/baton.v1.GenerationService/Generate",
                                request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(call(raw, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("text:"), err.value.details()
    assert ray.get(decode.free_blocks.remote()) == free
    assert generate(channel, text="still here", sampling=pb.SamplingParams(max_tokens=2))


def long_stream(channel, request_id: str = ""):
    """A streaming Generate of 1,500 tokens (EOS ignored): still running when cancelled."""
    stub = pb_grpc.GenerationServiceStub(channel)
    return stub, stub.Generate(pb.GenerateRequest(
        request_id=request_id, text="a long one", stream=True,
        sampling=pb.SamplingParams(max_tokens=1500, ignore_eos=True)), timeout=60)


def test_client_cancel_mid_stream_frees_the_blocks(served):
    dep, channel = served
    decode = dep.workers["grpc-fe/decode/0"][2]
    free = ray.get(decode.free_blocks.remote())
    _, call = long_stream(channel, request_id="client-cancel")
    for i, _ in enumerate(call):
        if i == 3:
            break
    assert ray.get(decode.free_blocks.remote()) < free  # it is decoding
    call.cancel()
    assert wait_blocks(decode, free) == free
    # Freed because it was aborted, not because it ran to its end.
    done = ray.get(dep.controller.stream.remote("client-cancel", 0, 1.0))
    assert done.finished and done.finish_reason == "abort" and len(done.token_ids) < 1500


@pytest.mark.parametrize("after", [0, 1, 2, 5, 8, 13, 21, 34])
def test_client_leaving_at_any_point_aborts_the_request(served, after):
    """Wherever the server is when the client goes (awaiting tokens or a write),
    the request is aborted, not run to its end."""
    dep, channel = served
    decode = dep.workers["grpc-fe/decode/0"][2]
    free = ray.get(decode.free_blocks.remote())
    rid = f"leaves-after-{after}"
    _, call = long_stream(channel, request_id=rid)
    for i, _ in enumerate(call):
        if i == after:
            break
    call.cancel()
    assert wait_blocks(decode, free) == free
    done = ray.get(dep.controller.stream.remote(rid, 0, 1.0))
    assert (done.finish_reason, len(done.token_ids) < 1500) == ("abort", True)


def test_cancel_rpc_mid_stream_ends_it_as_abort_and_frees_the_blocks(served):
    dep, channel = served
    decode = dep.workers["grpc-fe/decode/0"][2]
    free = ray.get(decode.free_blocks.remote())
    stub, call = long_stream(channel, request_id="cancel-me")
    first = next(call)
    assert first.WhichOneof("kind") == "chunk"
    assert stub.Cancel(pb.CancelRequest(request_id="cancel-me")).cancelled is True
    rest = list(call)
    assert rest[-1].final.finish_reason == pb.FINISH_REASON_ABORT
    tokens = sum(len(m.chunk.token_ids) for m in [first, *rest] if m.WhichOneof("kind") == "chunk")
    assert tokens < 1500 and rest[-1].final.usage.completion_tokens == tokens
    assert wait_blocks(decode, free) == free
    assert stub.Cancel(pb.CancelRequest(request_id="cancel-me")).cancelled is False  # idempotent


class SlowAdmission:
    """A controller stand-in whose ``submit`` takes ``delay_s``: the window in
    which a client may leave before its request exists."""

    def __init__(self, delay_s: float):
        self.delay_s, self.submitted, self.cancelled = delay_s, [], []

    async def submit(self, request_id, prompt_token_ids, params) -> str:
        await asyncio.sleep(self.delay_s)
        self.submitted.append(request_id)
        return request_id

    async def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True

    async def stream(self, request_id, cursor, idle_s):
        await asyncio.sleep(idle_s)
        raise AssertionError("a request whose client left during submit is never streamed")


def test_client_leaving_during_admission_cancels_the_request_once_admitted():
    from cluster.grpc_server import GrpcFrontend
    from cluster.validation import ModelLimits
    from workers.loader import load_tokenizer

    backend = SlowAdmission(delay_s=0.5)

    async def run() -> grpc.StatusCode:
        frontend = GrpcFrontend(backend, ModelLimits("tiny", 2048, 320), load_tokenizer("tiny"))
        port = await frontend.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                call = stub.Generate(pb.GenerateRequest(request_id="leaves-early", text="hi"),
                                     timeout=0.1)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
            deadline = time.monotonic() + 10
            while not backend.cancelled and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return err.value.code()
        finally:
            await frontend.stop(0)

    assert asyncio.run(run()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.submitted == backend.cancelled == ["leaves-early"]

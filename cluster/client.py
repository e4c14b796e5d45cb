"""Python client of Baton's gRPC API, synchronous and asyncio.

Lifecycle: open a ``BatonClient`` (or ``AsyncBatonClient``) on ``host:port``
with an optional bearer token; ``generate`` returns the finished
``Completion``; ``stream`` yields ``Delta``s as tokens arrive and a final
``Completion``; ``cancel``, ``models``, ``status``. A call refused with
UNAVAILABLE before any token arrived is retried with exponential backoff;
``deadline_s`` bounds the whole call.

    with BatonClient("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=16, temperature=0).text)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from proto.baton.v1 import serving_pb2 as pb
from proto.baton.v1 import serving_pb2_grpc as pb_grpc

_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
            pb.FINISH_REASON_ABORT: "abort"}


@dataclass(frozen=True)
class Delta:
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timing: dict = field(default_factory=dict)  # queue_s, prefill_s, kv_transfer_s, ttft_s, total_s


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 3.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield delay * (0.5 + random.random())  # jitter
            delay = min(delay * 2, self.max_backoff_s)


def build_request(prompt: str | list[int] | list[dict], *, request_id: str = "",
                  model: str = "", stream: bool = True, **sampling) -> pb.GenerateRequest:
    """``prompt``: text, token ids, or chat messages ``[{"role", "content"}]``."""
    req = pb.GenerateRequest(request_id=request_id, model=model, stream=stream,
                             sampling=_sampling(sampling))
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.chat.messages.extend(pb.ChatMessage(**m) for m in prompt)
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _sampling(kw: dict) -> pb.SamplingParams:
    stop = kw.pop("stop", None)
    stop_ids = kw.pop("stop_token_ids", None)
    params = pb.SamplingParams(**{k: v for k, v in kw.items() if v is not None})
    if stop:
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    if stop_ids:
        params.stop_token_ids.extend(stop_ids)
    return params


class _Collector:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text: list[str] = []

    def add(self, msg: pb.GenerateResponse) -> Delta | Completion:
        if msg.WhichOneof("kind") == "chunk":
            self.ids += msg.chunk.token_ids
            self.text.append(msg.chunk.text)
            return Delta(list(msg.chunk.token_ids), msg.chunk.text)
        f = msg.final
        t = f.timing
        return Completion(msg.request_id, self.ids, "".join(self.text),
                          _REASONS.get(f.finish_reason, "unknown"), f.usage.prompt_tokens,
                          f.usage.completion_tokens,
                          {"queue_s": t.queue_s, "prefill_s": t.prefill_s,
                           "kv_transfer_s": t.kv_transfer_s, "ttft_s": t.ttft_s,
                           "total_s": t.total_s})


def _retry_delay(exc: grpc.RpcError, started: bool, delays: Iterator[float]) -> float:
    """How long to wait before retrying; re-raises when the call must not be retried
    (it already streamed tokens, failed with anything but UNAVAILABLE, or ran out of tries)."""
    delay = next(delays, None)
    if started or exc.code() != grpc.StatusCode.UNAVAILABLE or delay is None:
        raise exc
    return delay


def _metadata(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else None


class BatonClient:
    def __init__(self, address: str, token: str | None = None,
                 retry: RetryPolicy | None = None, max_message_bytes: int = 16 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._gen = pb_grpc.GenerationServiceStub(self._channel)
        self._cluster = pb_grpc.ClusterServiceStub(self._channel)
        self._md = _metadata(token)
        self.retry = retry or RetryPolicy()

    def stream(self, prompt, *, deadline_s: float | None = None,
               **kw) -> Iterator[Delta | Completion]:
        end = time.monotonic() + deadline_s if deadline_s else None
        request = build_request(prompt, **kw)
        delays = self.retry.delays()
        while True:
            collector, started = _Collector(), False
            try:
                left = None if end is None else max(0.0, end - time.monotonic())
                for msg in self._gen.Generate(request, timeout=left, metadata=self._md):
                    started = True
                    yield collector.add(msg)
                return
            except grpc.RpcError as exc:
                time.sleep(_retry_delay(exc, started, delays))

    def generate(self, prompt, **kw) -> Completion:
        *_, final = self.stream(prompt, stream=False, **kw)
        return final

    def cancel(self, request_id: str) -> bool:
        return self._gen.Cancel(pb.CancelRequest(request_id=request_id), metadata=self._md).cancelled

    def models(self) -> list[pb.ModelInfo]:
        return list(self._gen.ListModels(pb.ListModelsRequest(), metadata=self._md).models)

    def status(self) -> pb.StatusResponse:
        return self._cluster.Status(pb.StatusRequest(), metadata=self._md)

    def drain(self) -> int:
        """Stop the server admitting work; returns requests still in flight."""
        return self._cluster.Drain(pb.DrainRequest(), metadata=self._md).in_flight

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncBatonClient:
    def __init__(self, address: str, token: str | None = None,
                 retry: RetryPolicy | None = None, max_message_bytes: int = 16 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._gen = pb_grpc.GenerationServiceStub(self._channel)
        self._cluster = pb_grpc.ClusterServiceStub(self._channel)
        self._md = _metadata(token)
        self.retry = retry or RetryPolicy()

    async def stream(self, prompt, *, deadline_s: float | None = None,
                     **kw) -> AsyncIterator[Delta | Completion]:
        end = time.monotonic() + deadline_s if deadline_s else None
        request = build_request(prompt, **kw)
        delays = self.retry.delays()
        while True:
            collector, started = _Collector(), False
            try:
                left = None if end is None else max(0.0, end - time.monotonic())
                async for msg in self._gen.Generate(request, timeout=left, metadata=self._md):
                    started = True
                    yield collector.add(msg)
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(_retry_delay(exc, started, delays))

    async def generate(self, prompt, **kw) -> Completion:
        final = None
        async for item in self.stream(prompt, stream=False, **kw):
            final = item
        return final

    async def cancel(self, request_id: str) -> bool:
        reply = await self._gen.Cancel(pb.CancelRequest(request_id=request_id), metadata=self._md)
        return reply.cancelled

    async def status(self) -> pb.StatusResponse:
        return await self._cluster.Status(pb.StatusRequest(), metadata=self._md)

    async def close(self) -> None:
        await self._channel.close()

"""The gRPC frontend: ``baton.v1`` GenerationService and ClusterService,
standard ``grpc.health.v1`` health and server reflection.

Lifecycle: ``GrpcFrontend.start(port)`` runs a ``grpc.aio`` server on the
event loop of the process that holds the controller (the controller actor),
so each token costs no extra hop. Per Generate call: authenticate (bearer
token in the ``authorization`` metadata) -> validate (INVALID_ARGUMENT naming
the field; a message protobuf cannot parse, e.g. a string that is not UTF-8,
too: ``cluster/grpc_decode.py``) -> submit (RESOURCE_EXHAUSTED when overloaded, UNAVAILABLE while
draining) -> stream chunks until the final message. A client deadline that
passes, or a client that goes away, cancels the request in every pool.
``drain()`` flips health to NOT_SERVING and refuses new work; ``stop(grace)``
lets in-flight streams finish first.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cluster.controller import Overloaded, Unavailable
from cluster.grpc_decode import MalformedRequests
from cluster.validation import (
    InvalidRequest,
    ModelLimits,
    ValidRequest,
    build_request,
    render_chat,
)
from proto.baton.v1 import serving_pb2 as pb
from proto.baton.v1 import serving_pb2_grpc as pb_grpc

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
          "abort": pb.FINISH_REASON_ABORT}
SERVICES = ("baton.v1.GenerationService", "baton.v1.ClusterService")


def _sampling(request: pb.GenerateRequest) -> dict:
    s = request.sampling
    fields = ("temperature", "top_p", "top_k", "max_tokens", "seed", "ignore_eos", "logprobs")
    out = {f: getattr(s, f) for f in fields if s.HasField(f)}
    if s.stop:
        out["stop"] = list(s.stop)
    if s.stop_token_ids:
        out["stop_token_ids"] = list(s.stop_token_ids)
    return out


def _prompt(request: pb.GenerateRequest) -> dict:
    kind = request.WhichOneof("input")
    if kind == "text":
        return {"prompt": request.text}
    if kind == "token_ids":
        return {"prompt": list(request.token_ids.ids)}
    if kind == "chat":
        return {"messages": [{"role": m.role, "content": m.content}
                             for m in request.chat.messages]}
    raise InvalidRequest("input", "one of text, token_ids or chat is required")


class _Auth:
    def __init__(self, token: str | None):
        self.token = token

    async def check(self, context) -> None:
        if self.token is None:
            return
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


@dataclass
class _Call:
    """One Generate call's request; ``finished`` once its final chunk arrived."""

    request_id: str
    finished: bool = False


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, frontend: GrpcFrontend):
        self.f = frontend

    async def Generate(self, request, context):  # noqa: N802 - gRPC name
        await self.f.auth.check(context)
        if self.f.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining")
        try:
            valid = build_request(self.f.limits, self.f.tokenizer, model=request.model,
                                  sampling=_sampling(request), request_id=request.request_id,
                                  render=self.f.render, **_prompt(request))
            rid = await self._admit(valid)
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except ValueError as exc:  # InvalidRequest, or the controller's own checks
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        call = self._cancel_unless_finished(rid, context)
        async for message in self._responses(call, len(valid.prompt_token_ids), request.stream,
                                             context):
            yield message

    async def _admit(self, valid: ValidRequest) -> str:
        """Submit ``valid``; a client that leaves meanwhile cancels it once admitted."""
        submit = asyncio.ensure_future(self.f.backend.submit(
            valid.request_id, valid.prompt_token_ids, valid.params))

        def cancel_once_admitted(fut: asyncio.Future) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.f.cancel_later(fut.result())

        try:
            return await asyncio.shield(submit)
        except asyncio.CancelledError:
            submit.add_done_callback(cancel_once_admitted)
            raise

    def _cancel_unless_finished(self, rid: str, context) -> _Call:
        """Cancel ``rid`` when its RPC ends before the request finished.

        A done callback rather than ``except CancelledError`` in the handler: a
        client that goes away while the server awaits a write cancels grpc's own
        task, outside this generator, which is then only closed (GeneratorExit)
        whenever it is collected; the request would run to its end.
        """
        call = _Call(rid)

        def on_done(_context) -> None:
            if not call.finished:
                self.f.cancel_later(rid)

        context.add_done_callback(on_done)
        return call

    async def _responses(self, call: _Call, prompt_tokens: int, stream: bool, context):
        rid, cursor, held_ids, held_text = call.request_id, 0, [], []
        while True:
            left = context.time_remaining()
            if left is not None and left <= 0:  # the done callback cancels the request
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
            chunk = await self.f.backend.stream(rid, cursor, min(5.0, left or 5.0))
            cursor = chunk.cursor
            if chunk.token_ids and stream:
                yield pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(
                    token_ids=chunk.token_ids, text=chunk.text))
            elif chunk.token_ids:
                held_ids += chunk.token_ids
                held_text.append(chunk.text)
            if chunk.finished:
                call.finished = True
                if not stream:
                    yield pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(
                        token_ids=held_ids, text="".join(held_text)))
                yield _final(rid, chunk, prompt_tokens, cursor)
                return

    async def Cancel(self, request, context):  # noqa: N802
        await self.f.auth.check(context)
        return pb.CancelResponse(cancelled=await self.f.backend.cancel(request.request_id))

    async def ListModels(self, request, context):  # noqa: N802
        await self.f.auth.check(context)
        lim = self.f.limits
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            id=lim.model_id, max_model_len=lim.max_model_len, vocab_size=lim.vocab_size)])


def _final(rid: str, chunk, prompt_tokens: int, completion_tokens: int) -> pb.GenerateResponse:
    t = chunk.timing
    return pb.GenerateResponse(request_id=rid, final=pb.Final(
        finish_reason=FINISH.get(chunk.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       cached_tokens=int(t.get("cached_tokens", 0))),
        timing=pb.Timing(queue_s=t.get("queue_s", 0.0), prefill_s=t.get("prefill_s", 0.0),
                         kv_transfer_s=t.get("kv_transfer_s", 0.0), ttft_s=t.get("ttft_s", 0.0),
                         total_s=t.get("total_s", 0.0))))


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    def __init__(self, frontend: GrpcFrontend):
        self.f = frontend

    async def Status(self, request, context):  # noqa: N802
        await self.f.auth.check(context)
        s = await self.f.backend.status()
        return pb.StatusResponse(
            cluster=s["name"], draining=self.f.draining, waiting=s["waiting"],
            running=s["running"], workers=[pb.WorkerStatus(
                worker_id=w["worker_id"], pool=w["worker_id"].split("/")[-2], role=w["role"],
                gpu_type=w["gpu_type"], device=w["device"], alive=w["alive"],
                running=w["running"], free_kv_blocks=w["free_kv_blocks"],
                total_kv_blocks=w["total_kv_blocks"]) for w in s["workers"]])

    async def Drain(self, request, context):  # noqa: N802
        await self.f.auth.check(context)
        await self.f.backend.drain_frontends()
        return pb.DrainResponse(in_flight=(await self.f.backend.status())["running"])


class GrpcFrontend:
    """Owns the grpc.aio server; ``backend`` is the controller (same process)."""

    def __init__(self, backend, limits: ModelLimits, tokenizer, token: str | None = None,
                 max_message_bytes: int = 16 << 20, render=render_chat):
        self.backend, self.limits, self.tokenizer = backend, limits, tokenizer
        self.render = render
        self.auth = _Auth(token)
        self.draining = False
        self.background: set[asyncio.Task] = set()  # cancels of abandoned calls, in flight
        self.health = HealthServicer()
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.server = grpc.aio.server(
            options=options, interceptors=(MalformedRequests(SERVICES, self.auth.check),))
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self), self.server)
        pb_grpc.add_ClusterServiceServicer_to_server(ClusterServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = 0

    def cancel_later(self, rid: str) -> None:
        """Cancel ``rid`` from a callback (a task, kept until it is done)."""
        task = asyncio.get_running_loop().create_task(self.backend.cancel(rid))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def start(self, host: str = "0.0.0.0", port: int = 50051) -> int:
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind the gRPC server to {host}:{port}")
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def drain(self) -> None:
        self.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float = 30.0) -> None:
        await self.drain()
        await self.server.stop(grace_s)

    async def _set_health(self, status) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, status)

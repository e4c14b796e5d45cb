"""The OpenAI-compatible HTTP frontend.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (whole or
streamed as server-sent events ending with ``data: [DONE]``), ``GET
/v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text).

Lifecycle: ``HttpFrontend.start(port)`` listens on the event loop of the
process that holds the controller (like the gRPC frontend). Per request:
authenticate the ``/v1`` routes (``Authorization: Bearer``; probes and
scrapes of ``/health`` and ``/metrics`` need no token) -> parse JSON ->
validate (400 naming the field, 404 for an unknown model) -> submit (429
when overloaded, 503 while draining or when Redis is down) -> answer. A
client that disconnects cancels its request in every pool. ``drain()`` makes
``/health`` answer 503 and refuses new work; ``stop(grace)`` waits for
in-flight requests, then closes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import aclosing

from cluster.controller import Overloaded, Unavailable
from cluster.http_protocol import HttpError, HttpRequest, Responder, serve_http
from cluster.openai_api import (
    OpenAIRequest,
    chat_choice,
    completion_choice,
    envelope,
    parse_chat,
    parse_completion,
    usage,
)
from cluster.validation import InvalidRequest, ModelLimits, render_chat

POLL_S = 0.5  # how often a waiting handler checks whether its client left


class HttpFrontend:
    def __init__(self, backend, limits: ModelLimits, tokenizer, token: str | None = None,
                 max_body_bytes: int = 16 << 20, render=render_chat):
        self.backend, self.limits, self.tokenizer = backend, limits, tokenizer
        self.token, self.max_body, self.render = token, max_body_bytes, render
        self.draining = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._routes = {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
        }

    async def start(self, host: str = "0.0.0.0", port: int = 8000) -> int:
        self.server = await serve_http(self._handle, host, port, self.max_body)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def drain(self) -> None:
        self.draining = True

    async def stop(self, grace_s: float = 30.0) -> None:
        await self.drain()
        if self.server is not None:
            self.server.close()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            pass

    # ----- dispatch -----------------------------------------------------------------
    async def _handle(self, request: HttpRequest, out: Responder) -> None:
        route = self._routes.get((request.method, request.path))
        try:
            if route is None:
                known = any(path == request.path for _, path in self._routes)
                raise HttpError(405 if known else 404, f"no route {request.method} "
                                f"{request.path}", code="method_not_allowed" if known else
                                "not_found")
            if request.path.startswith("/v1/"):
                self._authenticate(request)
            await route(request, out)
        except HttpError as err:
            if not out.started:
                await out.send_error(err)

    def _authenticate(self, request: HttpRequest) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise HttpError(401, "missing or wrong bearer token", "authentication_error",
                            code="invalid_api_key")

    # ----- routes -------------------------------------------------------------------
    async def _health(self, request: HttpRequest, out: Responder) -> None:
        if self.draining:
            raise HttpError(503, "server is draining", "service_unavailable_error",
                            code="draining")
        await out.send_json(200, {"status": "ok"})

    async def _metrics(self, request: HttpRequest, out: Responder) -> None:
        await out.send(200, await self.backend.metrics_text(),
                       "text/plain; version=0.0.4; charset=utf-8")

    async def _models(self, request: HttpRequest, out: Responder) -> None:
        lim = self.limits
        await out.send_json(200, {"object": "list", "data": [{
            "id": lim.model_id, "object": "model", "created": 0, "owned_by": "baton",
            "max_model_len": lim.max_model_len}]})

    async def _completions(self, request: HttpRequest, out: Responder) -> None:
        spec = self._parse(request, lambda body: parse_completion(body, self.limits,
                                                                  self.tokenizer))
        await self._generate(spec, out, "text_completion")

    async def _chat(self, request: HttpRequest, out: Responder) -> None:
        spec = self._parse(request, lambda body: parse_chat(body, self.limits, self.tokenizer,
                                                            self.render))
        await self._generate(spec, out, "chat.completion")

    def _parse(self, request: HttpRequest, parse) -> OpenAIRequest:
        try:
            body = json.loads(request.body)
        except UnicodeDecodeError:
            raise HttpError(400, "the request body is not valid UTF-8", param="body") from None
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"malformed JSON: {exc}", param="body") from None
        try:
            return parse(body)
        except InvalidRequest as exc:
            raise _invalid(exc) from None

    # ----- generation ---------------------------------------------------------------
    async def _generate(self, spec: OpenAIRequest, out: Responder, kind: str) -> None:
        if self.draining:
            raise HttpError(503, "server is draining", "service_unavailable_error",
                            code="draining")
        rid = await self._submit(spec)
        self._inflight += 1
        self._idle.clear()
        try:
            if spec.stream:
                await self._stream(rid, spec, out, kind)
            else:
                await self._whole(rid, spec, out, kind)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _submit(self, spec: OpenAIRequest) -> str:
        v = spec.valid
        try:
            return await self.backend.submit(v.request_id, v.prompt_token_ids, v.params)
        except Overloaded as exc:
            raise HttpError(429, str(exc), "rate_limit_error", code="overloaded") from None
        except Unavailable as exc:
            raise HttpError(503, str(exc), "service_unavailable_error",
                            code="unavailable") from None
        except ValueError as exc:  # the controller's own checks (e.g. a reused request_id)
            raise HttpError(400, str(exc), param="request_id" if "request_id" in str(exc)
                            else None) from None

    async def _follow(self, rid: str, out: Responder):
        """Chunks carrying tokens, then the final one; cancels the request if
        the client leaves (or anything else ends this early)."""
        cursor, done = 0, False
        try:
            while not done:
                if out.client_gone:
                    return
                chunk = await self.backend.stream(rid, cursor, POLL_S)
                cursor, done = chunk.cursor, chunk.finished
                if chunk.token_ids or done:
                    yield chunk
        finally:
            if not done:
                await asyncio.shield(self.backend.cancel(rid))

    async def _whole(self, rid: str, spec: OpenAIRequest, out: Responder, kind: str) -> None:
        ids, texts, final = [], [], None
        async with aclosing(self._follow(rid, out)) as chunks:
            async for chunk in chunks:
                ids += chunk.token_ids
                texts.append(chunk.text)
                final = chunk
        if final is None or not final.finished:
            return  # the client left
        token_ids = ids if spec.return_token_ids else None
        text = "".join(texts)
        choice = (completion_choice(text, final.finish_reason, token_ids)
                  if kind == "text_completion"
                  else chat_choice(text, final.finish_reason, token_ids, delta=False))
        await out.send_json(200, envelope(kind, rid, self.limits.model_id, [choice],
                                          usage_obj=self._usage(spec, final)))

    async def _stream(self, rid: str, spec: OpenAIRequest, out: Responder, kind: str) -> None:
        chat = kind == "chat.completion"
        kind = "chat.completion.chunk" if chat else kind
        created, model = int(time.time()), self.limits.model_id
        extra = {"usage": None} if spec.include_usage else {}

        async def send(choices: list[dict], **fields) -> None:
            obj = envelope(kind, rid, model, choices, created)
            await out.event(json.dumps({**obj, **extra, **fields}))

        await out.start_events()
        try:
            if chat:
                await send([chat_choice("", None, None, delta=True, first=True)])
            async with aclosing(self._follow(rid, out)) as chunks:
                async for chunk in chunks:
                    reason = chunk.finish_reason if chunk.finished else None
                    ids = chunk.token_ids if spec.return_token_ids else None
                    if chat:
                        text = chunk.text if chunk.token_ids else None
                        await send([chat_choice(text, reason, ids, delta=True)])
                    else:
                        await send([completion_choice(chunk.text, reason, ids)])
                    if chunk.finished and spec.include_usage:
                        await send([], usage=self._usage(spec, chunk))
            await out.event("[DONE]")
            await out.end_events()
        except ConnectionError:
            return  # _follow's cleanup already cancelled the request

    def _usage(self, spec: OpenAIRequest, final) -> dict:
        return usage(len(spec.valid.prompt_token_ids), final.cursor,
                     int(final.timing.get("cached_tokens", 0)))


def _invalid(exc: InvalidRequest) -> HttpError:
    if exc.field == "model":
        return HttpError(404, str(exc), param="model", code="model_not_found")
    return HttpError(400, str(exc), param=exc.field, code="invalid_value")

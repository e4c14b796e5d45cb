"""A small HTTP/1.1 server core on asyncio streams: just what an
OpenAI-compatible API needs.

Lifecycle: ``serve_http(handler, host, port)`` listens; each connection reads
requests one after another (keep-alive), hands each to ``handler(request,
responder)`` and goes on until the client closes, sends ``Connection:
close``, or a request is malformed. Bodies are bounded (413 before reading
an oversized one); headers are bounded by the stream limit. A response is
either whole (``send``) or a server-sent event stream (``start_events`` /
``event`` / ``end_events``, chunked on HTTP/1.1). Sockets get TCP_NODELAY so
each streamed token leaves at once instead of waiting for Nagle.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MAX_HEADER_BYTES = 64 << 10
MAX_HEADERS = 100
# An oversized body up to this many times the limit is read and dropped, so
# the client (still sending) gets the 413; a larger one just closes the socket.
DISCARD_FACTOR = 4
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
           429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


class HttpError(Exception):
    """An error response in the OpenAI shape ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type,
                                     "param": self.param, "code": self.code}}).encode()


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # without the query string
    version: str  # "HTTP/1.1" | "HTTP/1.0"
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        return conn != "close" if self.version == "HTTP/1.1" else conn == "keep-alive"


class Responder:
    """Writes one response to a connection; knows whether the client left."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 request: HttpRequest):
        self.reader, self.writer, self.request = reader, writer, request
        self.chunked = request.version == "HTTP/1.1"
        self.started = False

    @property
    def client_gone(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    async def send(self, status: int, body: bytes, content_type: str = "application/json",
                   headers: dict[str, str] | None = None) -> None:
        head = self._head(status, {"Content-Type": content_type,
                                   "Content-Length": str(len(body)), **(headers or {})})
        self.writer.write(head + body)
        await self.writer.drain()
        self.started = True

    async def send_json(self, status: int, obj) -> None:
        await self.send(status, json.dumps(obj).encode())

    async def send_error(self, err: HttpError) -> None:
        await self.send(err.status, err.body())

    async def start_events(self) -> None:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if self.chunked:
            headers["Transfer-Encoding"] = "chunked"
        self.writer.write(self._head(200, headers))
        self.started = True

    async def event(self, data: str) -> None:
        """One ``data:`` event; raises ConnectionError when the client left."""
        payload = f"data: {data}\n\n".encode()
        if self.chunked:
            payload = b"%x\r\n%s\r\n" % (len(payload), payload)
        self.writer.write(payload)
        await self.writer.drain()

    async def end_events(self) -> None:
        if self.chunked:
            self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    def _head(self, status: int, headers: dict[str, str]) -> bytes:
        keep = self.request.keep_alive and (self.chunked or "Content-Length" in headers)
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
                 *(f"{k}: {v}" for k, v in headers.items()),
                 f"Connection: {'keep-alive' if keep else 'close'}", "", ""]
        return "\r\n".join(lines).encode("latin-1")


Handler = Callable[[HttpRequest, Responder], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader, max_body: int) -> HttpRequest | None:
    """The next request, or None at a clean end of the connection."""
    try:
        line = await reader.readline()
    except (asyncio.LimitOverrunError, ValueError):
        raise HttpError(431, "request line too long") from None
    if not line:
        return None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(400, "malformed HTTP request line")
    method, target, version = parts
    headers = await _read_headers(reader)
    body = await _read_body(reader, headers, max_body)
    return HttpRequest(method, target.split("?", 1)[0], version, headers, body)


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        try:
            line = await reader.readline()
        except (asyncio.LimitOverrunError, ValueError):
            raise HttpError(431, "header line too long") from None
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    raise HttpError(431, f"more than {MAX_HEADERS} headers")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], max_body: int) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return await _read_chunked(reader, max_body)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "Content-Length is not an integer") from None
    if length < 0:
        raise HttpError(400, "Content-Length is negative")
    if length > max_body:
        if length <= DISCARD_FACTOR * max_body:  # read it away so the client sees the answer
            await _discard(reader, length)
        raise HttpError(413, f"request body of {length} bytes exceeds the limit of "
                             f"{max_body} bytes", code="request_too_large")
    return await reader.readexactly(length)


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        got = await reader.read(min(length, 1 << 20))
        if not got:
            return
        length -= len(got)


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        try:
            size = int((await reader.readline()).split(b";", 1)[0].strip() or b"x", 16)
        except ValueError:
            raise HttpError(400, "malformed chunk size") from None
        if size == 0:
            await _read_headers(reader)  # trailers
            return bytes(body)
        if len(body) + size > max_body:
            raise HttpError(413, f"request body exceeds the limit of {max_body} bytes",
                            code="request_too_large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _connection(reader, writer, handler: Handler, max_body: int) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                request = await read_request(reader, max_body)
            except HttpError as err:  # answer, then close: the stream position is unknown
                dummy = HttpRequest("GET", "/", "HTTP/1.1", {"connection": "close"}, b"")
                await Responder(reader, writer, dummy).send_error(err)
                return
            if request is None:
                return
            responder = Responder(reader, writer, request)
            await handler(request, responder)
            if not request.keep_alive or writer.is_closing():
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the client went away
    finally:
        writer.close()


async def serve_http(handler: Handler, host: str, port: int, max_body: int) -> asyncio.Server:
    return await asyncio.start_server(
        lambda r, w: _connection(r, w, handler, max_body), host, port, limit=MAX_HEADER_BYTES)

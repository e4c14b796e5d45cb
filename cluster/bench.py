"""``baton bench``: a load generator against Baton's gRPC or HTTP endpoint.

Lifecycle: build the requests and their send times (``cluster.bench_data``)
-> send each at its time, at most ``concurrency`` in flight, streaming, and
time every token as it arrives -> summarise TTFT, TPOT, ITL and E2E
(mean/p50/p90/p99), request and token throughput, and goodput under the SLOs.
The HTTP client is a few lines of asyncio over one connection per request
(with TCP_NODELAY), so what is timed is the server, not a client library.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cluster.bench_data import BenchRequest


@dataclass
class Outcome:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Target:
    kind: str  # grpc | http
    address: str  # grpc: HOST:PORT; http: base URL
    endpoint: str = "completions"  # http: completions | chat
    model: str = ""
    token: str | None = None


# ----- clients --------------------------------------------------------------------
async def _grpc_one(client, req: BenchRequest, target: Target) -> Outcome:
    from cluster.client import Completion

    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async for item in client.stream(req.prompt, model=target.model, temperature=0.0,
                                    max_tokens=req.output_tokens, ignore_eos=True):
        if isinstance(item, Completion):
            return _outcome(start, times, tokens or item.completion_tokens, item.prompt_tokens)
        if item.token_ids:
            times.append(time.perf_counter())
            tokens += len(item.token_ids)
    return Outcome(False, error="stream ended without a final message")


async def _http_one(req: BenchRequest, target: Target) -> Outcome:
    url = urlsplit(target.address)
    body = {"model": target.model or None, "max_tokens": req.output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    if target.endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        path, body["prompt"] = "/v1/completions", req.prompt
    data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    auth = f"Authorization: Bearer {target.token}\r\n" if target.token else ""
    head = (f"POST {url.path.rstrip('/')}{path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        writer.write(head + data)
        await writer.drain()
        return await _read_sse(reader, start)
    finally:
        writer.close()


async def _read_sse(reader: asyncio.StreamReader, start: float) -> Outcome:
    status = (await reader.readline()).decode().split(" ", 2)
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    if len(status) < 2 or status[1] != "200":
        return Outcome(False, error=f"HTTP {' '.join(status[1:]).strip()}")
    times: list[float] = []
    usage: dict = {}
    async for event in _events(reader):
        if event == "[DONE]":
            tokens = usage.get("completion_tokens", len(times))
            return _outcome(start, times, tokens, usage.get("prompt_tokens", 0))
        obj = json.loads(event)
        usage = obj.get("usage") or usage
        choice = (obj.get("choices") or [{}])[0]
        # Token ids, when the server returns them: a text delta can be empty
        # while a multi-byte character is incomplete.
        if choice.get("token_ids") or choice.get("text") or \
                (choice.get("delta") or {}).get("content"):
            times.append(time.perf_counter())
    return Outcome(False, error="stream ended before [DONE]")


async def _events(reader: asyncio.StreamReader):
    """``data:`` payloads of a chunked SSE body."""
    buffer = b""
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        buffer += await reader.readexactly(size)
        await reader.readexactly(2)
        *events, buffer = buffer.split(b"\n\n")
        for ev in events:
            for line in ev.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:].decode()


def _outcome(start: float, times: list[float], tokens: int, prompt_tokens: int) -> Outcome:
    if not times:
        return Outcome(False, error="no token arrived")
    end = times[-1]
    return Outcome(True, times[0] - start, end - start,
                   [b - a for a, b in zip(times, times[1:])], tokens, prompt_tokens)


# ----- the run ----------------------------------------------------------------------
async def run_load(target: Target, requests: list[BenchRequest], offsets: list[float],
                   concurrency: int | None, progress=None) -> tuple[list[Outcome], float]:
    limit = asyncio.Semaphore(concurrency or len(requests) or 1)
    client = None
    if target.kind == "grpc":
        from cluster.client import AsyncBatonClient

        client = AsyncBatonClient(target.address, token=target.token)

    async def one(req: BenchRequest, at: float) -> Outcome:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        async with limit:
            try:
                out = await (_grpc_one(client, req, target) if client
                             else _http_one(req, target))
            except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                out = Outcome(False, error=f"{type(exc).__name__}: {exc}")
        if progress is not None:
            progress.update(1)
        return out

    t0 = time.perf_counter()
    try:
        outcomes = await asyncio.gather(*(one(r, a) for r, a in zip(requests, offsets)))
    finally:
        if client is not None:
            await client.close()
    return list(outcomes), time.perf_counter() - t0


# ----- the report -------------------------------------------------------------------
def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1e3

    return {"mean": statistics.fmean(values) * 1e3, "p50": pct(50), "p90": pct(90),
            "p99": pct(99)}


def summarise(outcomes: list[Outcome], duration_s: float, slo: dict[str, float]) -> dict:
    ok = [o for o in outcomes if o.ok]
    tpots = [o.tpot_s for o in ok if o.tpot_s is not None]
    good = [o for o in ok if o.ttft_s * 1e3 <= slo.get("ttft", float("inf"))
            and (o.tpot_s or 0.0) * 1e3 <= slo.get("tpot", float("inf"))
            and o.e2e_s * 1e3 <= slo.get("e2e", float("inf"))]
    out_tokens = sum(o.output_tokens for o in ok)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "completed": len(ok), "failed": len(outcomes) - len(ok), "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_token_throughput": out_tokens / duration_s,
        "total_token_throughput": (out_tokens + sum(o.prompt_tokens for o in ok)) / duration_s,
        "goodput": len(good) / duration_s, "slo_ms": slo,
        "ttft_ms": _stats_ms([o.ttft_s for o in ok]), "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([g for o in ok for g in o.itl_s]),
        "e2e_ms": _stats_ms([o.e2e_s for o in ok]),
    }


def render(report: dict) -> str:
    lines = [f"completed {report['completed']}, failed {report['failed']} in "
             f"{report['duration_s']:.2f} s",
             f"request throughput  {report['request_throughput']:.2f} req/s",
             f"output throughput   {report['output_token_throughput']:.1f} tok/s",
             f"total throughput    {report['total_token_throughput']:.1f} tok/s",
             f"goodput             {report['goodput']:.2f} req/s (SLO {report['slo_ms'] or 'none'})",
             f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = report[f"{name}_ms"]
        cells = "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}"
                        for v in (s["mean"], s["p50"], s["p90"], s["p99"]))
        lines.append(f"{name.upper():<6}{cells}")
    for error, n in report["errors"].items():
        lines.append(f"error x{n}: {error}")
    return "\n".join(lines)


def parse_slo(items: list[str]) -> dict[str, float]:
    """``ttft:500 tpot:50`` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slo = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"--slo: {item!r} must be ttft:MS, tpot:MS or e2e:MS")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {value!r} in {item!r} is not a number") from None
        if slo[name] <= 0:
            raise ValueError(f"--slo: {item!r} must be positive")
    return slo


def report_json(report: dict, settings: dict) -> str:
    return json.dumps({"settings": settings, **report}, indent=1, default=str)


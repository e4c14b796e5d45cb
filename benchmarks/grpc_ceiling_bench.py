"""How fast can grpcio itself stream bytes here? The ceiling under Baton's `grpc` KV transport.

No Baton code on the data path: the payload is cut into ready-made ``bytes``
chunks before timing, and each receiver only counts what arrives. Each
variant's receiver is its own spawned process; the sender is this process.

- raw TCP: ``sendall`` of the chunks, the receiver ``recv_into`` one 4 MiB
  buffer (the reference every ratio is taken against);
- sync server: ``grpc.server`` with a thread pool, one client-streaming call
  (the shape Baton's receiver has), and the same split over 2 and 4 calls at
  once (more streams, one channel);
- aio server: ``grpc.aio.server``, the handler iterating the request stream,
  or reading it with ``context.read()``; 1 and 2 calls at once.

Both sides use the options Baton's KV channel uses (16 MiB HTTP/2 frames,
large socket reads). Variants alternate within each round; medians over the
rounds.

Usage::

    .venv/bin/python benchmarks/grpc_ceiling_bench.py --rounds 15 [--mib 128] [--json FILE|-]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from bench_common import emit_report, machine

MIB = 1 << 20
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.http2.max_frame_size", (16 << 20) - 1)]
_SERVER_OPTIONS = _OPTIONS + [("grpc.experimental.tcp_read_chunk_size", 4 << 20),
                              ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
                              ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20)]


def _handlers(push) -> tuple:
    handler = grpc.stream_unary_rpc_method_handler(push)
    return (grpc.method_handlers_generic_handler("bench.Sink", {"Push": handler}),)


def _sync_server(ports: mp.Queue, total: int) -> None:
    def push(requests, context) -> bytes:
        return sum(len(m) for m in requests).to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(8), options=_SERVER_OPTIONS)
    server.add_generic_rpc_handlers(_handlers(push))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _aio_server(ports: mp.Queue, total: int, read_calls: bool = False) -> None:
    async def push(requests, context) -> bytes:
        n = 0
        if read_calls:
            while (m := await context.read()) is not grpc.aio.EOF:
                n += len(m)
        else:
            async for m in requests:
                n += len(m)
        return n.to_bytes(8, "little")

    async def main() -> None:
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        server.add_generic_rpc_handlers(_handlers(push))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _aio_read_server(ports: mp.Queue, total: int) -> None:
    _aio_server(ports, total, read_calls=True)


def _tcp_server(ports: mp.Queue, total: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    buf = memoryview(bytearray(4 * MIB))
    while True:
        conn, _ = listener.accept()
        got = 0
        while got < total:
            got += conn.recv_into(buf)
        conn.sendall(b"ok")
        conn.close()


def _tcp_sender(port: int, chunks: list[bytes]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for c in chunks:
                conn.sendall(c)
            conn.recv(2)
        return time.perf_counter() - t0
    return run


def _grpc_sender(port: int, chunks: list[bytes], streams: int) -> Callable[[], float]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=_OPTIONS)
    push = channel.stream_unary("/bench.Sink/Push")
    push(iter([b"warm-up"]))
    per = len(chunks) // streams

    def run() -> float:
        t0 = time.perf_counter()
        calls = [push.future(iter(chunks[i * per:(i + 1) * per])) for i in range(streams)]
        received = sum(int.from_bytes(c.result(), "little") for c in calls)
        elapsed = time.perf_counter() - t0
        assert received == per * streams * len(chunks[0]), received
        return elapsed
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mib", type=int, default=128, help="payload per transfer (1 MiB chunks)")
    ap.add_argument("--json", nargs="?", const="-", default=None)
    args = ap.parse_args()
    total = args.mib * MIB
    payload = os.urandom(total)
    chunks = [payload[i:i + MIB] for i in range(0, total, MIB)]

    ctx = mp.get_context("spawn")
    servers = {"tcp": _tcp_server, "sync": _sync_server, "aio": _aio_server,
               "aio-read": _aio_read_server}
    ports, procs = {}, []
    for name, target in servers.items():
        q = ctx.Queue()
        proc = ctx.Process(target=target, args=(q, total), daemon=True)
        proc.start()
        procs.append(proc)
        ports[name] = q.get(timeout=60)
    variants = {"raw TCP": _tcp_sender(ports["tcp"], chunks)}
    for server, streams in (("sync", 1), ("sync", 2), ("sync", 4), ("aio", 1), ("aio", 2),
                            ("aio-read", 1), ("aio-read", 2)):
        variants[f"gRPC {server} server, {streams} stream(s)"] = _grpc_sender(
            ports[server], chunks, streams)
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, run in variants.items():
            seconds[name].append(run())
    for proc in procs:
        proc.terminate()
    rows = []
    base = statistics.median(total / s for s in seconds["raw TCP"])
    for name, secs in seconds.items():
        rates = [total / s / 1e9 for s in secs]
        rows.append({"path": name, "gbps_p50": statistics.median(rates), "gbps_min": min(rates),
                     "gbps_max": max(rates), "vs_raw_tcp": statistics.median(rates) * 1e9 / base})
    report = {"machine": machine(), "mib": args.mib, "rounds": args.rounds,
              "load_avg_start": load, "load_avg_end": os.getloadavg()[0], "rows": rows}
    emit_report(report, args.json, _print)


def _print(report: dict) -> None:
    print(f"{report['mib']} MiB in 1 MiB chunks, {report['rounds']} rounds, "
          f"load {report['load_avg_start']:.1f} -> {report['load_avg_end']:.1f}; {report['machine']}")
    print("| path | GB/s p50 (min-max) | vs raw TCP |\n|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['path']} | {r['gbps_p50']:.2f} ({r['gbps_min']:.2f}-{r['gbps_max']:.2f}) "
              f"| {r['vs_raw_tcp']:.0%} |")


if __name__ == "__main__":
    main()

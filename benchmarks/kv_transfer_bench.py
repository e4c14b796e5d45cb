"""KV transfer throughput per transport, through Baton's real code path,
against raw loopback TCP moving the same bytes in the same chunks, in the
same run.

Payload (default 8192 tokens = 128 MiB): one request's KV shaped like
llama-60m's, fp32 — per layer a buffer (2, n_blocks, 16, kv_heads=4,
head_dim=64); 8 layers of 512 blocks. Random contents.

Per transport (``grpc``, ``nccl`` = gloo on CPU) the decode side runs in a
SEPARATE PROCESS (multiprocessing spawn), as in production: it owns a paged
KV cache (twice the payload's blocks), a ``ReceiverCore`` over it and
``make_receiver(name, core)``. One timed transfer is exactly what a prefill
worker does for one request::

    receiver.expect(rid, block_ids)          # in the receiver process, untimed
    t0
    handle = make_sender(name).open(rid, endpoint, n_layers)
    handle.send_layer(l, buffer_l)  for each layer  (returns at once)
    result = handle.finish()                 # receiver placed every block in
                                             # its cache and checked its CRC-32
    t1                                       # GB/s = payload bytes / (t1 - t0)

Peers in the same run, each with its receiver in a separate process:

- ``raw-tcp``: one loopback TCP connection. The sender ``sendmsg``s each
  chunk (``--chunk-mib``, the gRPC chunk size) with a 17-byte frame header
  straight from the tensors' memory; the receiver ``recv_into``s the header
  and then the chunk straight into a preallocated layer buffer, and answers
  one byte after the last. No checksum, no copy in user space: the ceiling
  of moving these bytes between two processes on this machine.
- ``raw-tcp + Baton checks``: the same TCP frames plus the work Baton's
  receiver cannot skip, using Baton's own functions: the sender computes
  ``block_checksums`` per layer (sent ahead of the layer's chunks); the
  receiver reads each chunk into a buffer, copies it into the reserved
  blocks of a KV cache (``placement.DirectSink``) and checks every block's
  CRC there.
- ``grpc floor``: a bare gRPC client stream of the same chunks (raw-bytes
  messages, no protobuf, no checksum; the handler only counts bytes): what
  the gRPC library itself costs on this machine.

Repetitions are interleaved (each round runs every path once, in a rotating
order) so the load of this shared machine hits all of them alike; one
warm-up round first (it also opens the gRPC channels / gloo pair). We report
the median (and min/max) of ``--reps`` rounds, and each path's ratio to the
raw TCP median of the same run, plus the CPU time (user+sys) each process
spent per transfer: on a 2-core machine a path cannot be faster than its
total CPU time / 2, whatever its overlap.

``--breakdown`` (on by default): single-threaded throughput of each step the
gRPC path performs on the payload, measured in this process.

``--what-if`` also runs Baton's gRPC path with other settings: 2 and 4 MiB
chunks (``GrpcKVSender(chunk_bytes=...)``), gRPC's default 16 KiB HTTP/2 frames
instead of Baton's 16 MiB ones, and, when the ``isal`` package is installed, CRC-32 by zlib on both sides (what a deployment without ``isal``
gets).

``--profile SECONDS`` loops gRPC transfers while ``py-spy record --native``
samples the sender and the receiver process, and prints the share of active
samples per category.

Usage::

    python benchmarks/kv_transfer_bench.py                 # 128 MiB, 7 rounds
    python benchmarks/kv_transfer_bench.py --reps 9 --what-if --profile 10 --json out.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path

from bench_common import emit_report, machine

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 4, 64  # llama-60m
MIB = 1 << 20
FRAME = struct.Struct("!BIQI")  # kind (0 data, 1 block CRCs), layer, offset, length
GRPC_FLOOR_METHOD = "/bench.Floor/Push"


def crc_patch(variant: str) -> None:
    """What-ifs in this process: ``zlib``: CRC-32 by zlib (same values as ISA-L);
    ``frames16k``: gRPC's default 16 KiB HTTP/2 frames instead of Baton's."""
    if variant == "zlib":
        import kvtransfer.integrity

        kvtransfer.integrity.crc32 = zlib.crc32
    elif variant == "frames16k":
        import kvtransfer.grpc_transport as gt

        gt._OPTIONS = [o for o in gt._OPTIONS if o[0] != "grpc.http2.max_frame_size"]
        gt._SERVER_OPTIONS = [o for o in gt._SERVER_OPTIONS
                              if o[0] != "grpc.http2.max_frame_size"]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----- receiver processes ----------------------------------------------------------
def kv_receiver_main(conn, transport: str, variant: str, cache_blocks: int, n_layers: int,
                     torch_threads: int, device: str = "cpu") -> None:
    """Decode side: a KV cache, a ReceiverCore and Baton's receiver; commands
    come over ``conn``."""
    import torch

    torch.set_num_threads(torch_threads)
    crc_patch(variant)
    from kvtransfer import make_receiver
    from kvtransfer.base import ReceiverCore

    data = torch.zeros(n_layers, 2, cache_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device)
    layers = [(data[i, 0], data[i, 1]) for i in range(n_layers)]
    receiver = make_receiver(transport, ReceiverCore(layers))
    conn.send(("endpoint", receiver.endpoint))
    while True:
        cmd = conn.recv()
        if cmd[0] == "expect":
            receiver.expect(cmd[1], cmd[2])
            conn.send(("ok",))
        elif cmd[0] == "take":
            res = receiver.take(cmd[1])
            conn.send(("taken", res.state.value if res else None,
                       res.bytes_received if res else 0))
        elif cmd[0] == "check":  # CRC of what landed in the named blocks, layer 0 keys
            ids = torch.tensor(cmd[1], device=device)
            conn.send(("crc", zlib.crc32(data[0, 0, ids].cpu().numpy().tobytes())))
        elif cmd[0] == "stop":
            receiver.close()
            conn.send(("bye",))
            return


def grpc_floor_main(conn, max_message: int) -> None:
    """A bare gRPC server: the handler counts the bytes of a client stream."""
    from concurrent import futures

    import grpc

    from kvtransfer import grpc_transport as gt

    def push(request_iterator, context):
        return sum(len(m) for m in request_iterator).to_bytes(8, "little")

    opts = [o for o in gt._SERVER_OPTIONS if "message_length" not in o[0]] + [
        ("grpc.max_receive_message_length", max_message)]
    server = grpc.server(futures.ThreadPoolExecutor(4), options=opts)
    service, method = GRPC_FLOOR_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        service, {method: grpc.stream_unary_rpc_method_handler(push)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(("endpoint", f"127.0.0.1:{port}"))
    conn.recv()
    server.stop(0).wait()


def tcp_receiver_main(conn, layer_shape: tuple, n_layers: int, verified: bool,
                      chunk: int, torch_threads: int) -> None:
    """Raw TCP peer: accept one connection; read frames until the whole
    payload is in, then answer one byte. Plain: each chunk is ``recv_into``
    its place in a preallocated layer buffer. ``verified``: each chunk is read
    into a buffer and placed into reserved blocks of a KV cache by Baton's
    ``DirectSink``; each complete layer is checked against the CRCs the
    sender framed ahead of it."""
    import numpy as np
    import torch

    torch.set_num_threads(torch_threads)
    from kvtransfer.placement import DirectSink

    n_blocks = layer_shape[1]
    bufs = [torch.empty(layer_shape) for _ in range(n_layers)]
    views = [memoryview(b.view(-1).view(torch.uint8).numpy()) for b in bufs]
    layer_bytes, total = len(views[0]), n_layers * len(views[0])
    if verified:
        cache = torch.zeros(n_layers, 2, 2 * n_blocks, *layer_shape[2:])
        ids = torch.randperm(2 * n_blocks)[:n_blocks].tolist()
        sinks = [DirectSink(cache[i, 0], cache[i, 1], ids) for i in range(n_layers)]
        staging = np.empty(chunk, np.uint8)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conn.send(("endpoint", srv.getsockname()[1]))
    s, _ = srv.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(FRAME.size)
    while True:
        got, crcs, landed = 0, {}, [0] * n_layers
        while got < total:
            if not _recv_into_exact(s, memoryview(head)):
                return
            kind, layer, offset, length = FRAME.unpack(head)
            if kind == 1:
                crcs[layer] = struct.unpack(f"!{n_blocks}I", _recv_exact(s, length))
                continue
            if not verified:
                if not _recv_into_exact(s, views[layer][offset:offset + length]):
                    return
            else:
                if not _recv_into_exact(s, memoryview(staging)[:length]):
                    return
                sinks[layer].write(offset, staging[:length])
                landed[layer] += length
                if landed[layer] == layer_bytes and not sinks[layer].finish(crcs[layer]):
                    raise RuntimeError("raw-tcp + Baton checks: checksum mismatch")
            got += length
        s.sendall(b"\x01")


def _recv_into_exact(s: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        k = s.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if not _recv_into_exact(s, memoryview(buf)):
        raise ConnectionError("peer closed")
    return bytes(buf)


def _sendmsg_all(s: socket.socket, parts: list) -> None:
    """``sendall`` for a gather list: no concatenation copy."""
    parts = [memoryview(p) for p in parts]
    while parts:
        n = s.sendmsg(parts)
        while n:
            if n >= len(parts[0]):
                n -= len(parts.pop(0))
            else:
                parts[0], n = parts[0][n:], 0


# ----- sender side (this process) ----------------------------------------------------
class _Path:
    """A receiver process plus the sending side here."""

    label: str
    proc: mp.Process

    def _spawn(self, target, *args) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, daemon=True, args=(child, *args))
        self.proc.start()
        _, self.endpoint = self.conn.recv()

    def timed(self, send) -> dict:
        cpu0 = cpu_s(os.getpid()), cpu_s(self.proc.pid)
        t0 = time.perf_counter()
        t_sent = send()
        t1 = time.perf_counter()
        cpu1 = cpu_s(os.getpid()), cpu_s(self.proc.pid)
        return {"seconds": t1 - t0, "send_layer_s": (t_sent or t1) - t0,
                "cpu_send_s": cpu1[0] - cpu0[0], "cpu_recv_s": cpu1[1] - cpu0[1]}


class KVPath(_Path):
    """One Baton transport (or a what-if setting of it)."""

    def __init__(self, label: str, transport: str, variant: str, layers, cache_blocks: int,
                 torch_threads: int, chunk_bytes: int):
        self.label, self.transport, self.variant = label, transport, variant
        self.layers, self.cache_blocks, self.chunk_bytes = layers, cache_blocks, chunk_bytes
        self.device = str(layers[0].device)  # the receiver's cache lives on the same kind
        self._spawn(kv_receiver_main, transport, variant, cache_blocks, len(layers),
                    torch_threads, self.device)
        self.sender = None  # built on first use
        self.n = 0
        self.n_blocks = layers[0].shape[1]

    def _make_sender(self):
        from kvtransfer import make_sender
        from kvtransfer.grpc_transport import GrpcKVSender

        if self.transport == "grpc":
            return GrpcKVSender(chunk_bytes=self.chunk_bytes)
        return make_sender(self.transport, self.device)

    def once(self) -> dict:
        import random

        import kvtransfer.integrity as integrity

        if self.sender is None:
            self.sender = self._make_sender()
        self.n += 1
        rid = f"{self.label}-{self.n}"
        block_ids = random.Random(self.n).sample(range(self.cache_blocks), self.n_blocks)
        self.conn.send(("expect", rid, block_ids))
        self.conn.recv()
        import kvtransfer.grpc_transport as gt

        saved = integrity.crc32, gt._OPTIONS, gt._SERVER_OPTIONS
        crc_patch(self.variant)
        result = None

        def send():
            nonlocal result
            handle = self.sender.open(rid, self.endpoint, len(self.layers))
            for i, buf in enumerate(self.layers):
                handle.send_layer(i, buf)
            t_sent = time.perf_counter()
            result = handle.finish()
            return t_sent
        try:
            out = self.timed(send)
        finally:
            integrity.crc32, gt._OPTIONS, gt._SERVER_OPTIONS = saved
        self.conn.send(("take", rid))
        _, state, nbytes = self.conn.recv()
        if not result.ok or state != "success":
            raise RuntimeError(f"{self.label}: transfer failed: {result.error} ({state})")
        return {**out, "bytes": nbytes, "attempts": result.attempts, "block_ids": block_ids}

    def check(self, block_ids) -> int:
        self.conn.send(("check", block_ids))
        return self.conn.recv()[1]

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self.conn.send(("stop",))
        self.conn.recv()
        self.proc.join(5)


class GrpcFloorPath(_Path):
    """The same chunks as raw-bytes messages of one bare gRPC client stream."""

    def __init__(self, layers, chunk_bytes: int):
        import grpc

        from kvtransfer.sender import byte_view

        self.label = "grpc floor (bare stream)"
        self.views = [byte_view(b) for b in layers]
        self.chunk = chunk_bytes
        self._spawn(grpc_floor_main, 2 * chunk_bytes)
        opts = [("grpc.max_send_message_length", 2 * chunk_bytes)]
        self.channel = grpc.insecure_channel(self.endpoint, options=opts)
        self.push = self.channel.stream_unary(GRPC_FLOOR_METHOD)

    def _messages(self):
        for layer, view in enumerate(self.views):
            for off in range(0, len(view), self.chunk):
                data = view[off:off + self.chunk]
                yield b"".join((FRAME.pack(0, layer, off, len(data)), data))

    def once(self) -> dict:
        total = sum(len(v) for v in self.views)
        reply = {}

        def send():
            reply["n"] = int.from_bytes(self.push(self._messages()), "little")
        out = self.timed(send)
        if reply["n"] != total + FRAME.size * sum(-(-len(v) // self.chunk) for v in self.views):
            raise RuntimeError(f"{self.label}: the server counted {reply['n']} bytes")
        return out

    def close(self) -> None:
        self.channel.close()
        self.conn.send(("stop",))
        self.proc.join(5)


class TcpPath(_Path):
    """Raw TCP between two processes, framed in the gRPC chunk size;
    ``verified`` adds Baton's checksums and placement into a KV cache."""

    def __init__(self, layers, verified: bool, chunk_bytes: int, torch_threads: int):
        from kvtransfer.sender import byte_view

        self.label = "raw-tcp + Baton checks" if verified else "raw-tcp"
        self.layers, self.verified, self.chunk = layers, verified, chunk_bytes
        self.views = [byte_view(b) for b in layers]
        self._spawn(tcp_receiver_main, tuple(layers[0].shape), len(layers), verified,
                    chunk_bytes, torch_threads)
        self.s = socket.create_connection(("127.0.0.1", self.endpoint))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self) -> None:
        from kvtransfer.integrity import block_checksums

        for layer, (buf, view) in enumerate(zip(self.layers, self.views, strict=True)):
            if self.verified:
                crcs = block_checksums(buf)
                raw = struct.pack(f"!{len(crcs)}I", *crcs)
                _sendmsg_all(self.s, [FRAME.pack(1, layer, 0, len(raw)), raw])
            for off in range(0, len(view), self.chunk):
                data = view[off:off + self.chunk]
                _sendmsg_all(self.s, [FRAME.pack(0, layer, off, len(data)), data])
        if self.s.recv(1) != b"\x01":
            raise RuntimeError(f"{self.label}: no ack")

    def once(self) -> dict:
        return self.timed(self._send)

    def close(self) -> None:
        self.s.close()
        self.proc.join(5)


# ----- breakdown: single-threaded cost of each step ----------------------------------------
def _rate(fn, nbytes: int, reps: int = 3) -> float:
    """Best-of-``reps`` GB/s of ``fn()`` processing ``nbytes``."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def breakdown(layers, chunk: int) -> list[dict]:
    import numpy as np
    import torch

    from kvtransfer import grpc_transport as gt
    from kvtransfer import integrity
    from kvtransfer.placement import DirectSink, as_bytes
    from kvtransfer.sender import OutgoingLayer, byte_view

    total = sum(b.numel() * b.element_size() for b in layers)
    raws = [byte_view(b) for b in layers]
    n_blocks = layers[0].shape[1]
    headers = [OutgoingLayer("r", i, len(layers), b).header(1) for i, b in enumerate(layers)]

    def crc_blocks():
        for b in layers:
            integrity.block_checksums(b)

    def crc_blocks_zlib():
        saved, integrity.crc32 = integrity.crc32, zlib.crc32
        try:
            crc_blocks()
        finally:
            integrity.crc32 = saved

    def encode():
        for h, r in zip(headers, raws, strict=True):
            for _ in gt.encode_chunks(h, r, chunk):
                pass

    wires = [w for h, r in zip(headers, raws, strict=True) for w in gt.encode_chunks(h, r, chunk)]

    def decode():
        for w in wires:
            gt.decode_chunk(w)

    decoded = [gt.decode_chunk(w) for w in wires]
    cache = torch.zeros(2, 2 * n_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    ids = torch.randperm(2 * n_blocks)[:n_blocks].tolist()
    sinks: dict[int, DirectSink] = {}

    def place():  # a fresh sink per layer, as the receiver has: CRC-32 runs in stream order
        for fields, data in decoded:
            if fields.offset == 0:
                sinks[fields.layer] = DirectSink(cache[0], cache[1], ids)
            sinks[fields.layer].write(fields.offset, as_bytes(data))

    def copy_ref():
        dst = np.empty(len(raws[0]), np.uint8)
        for r in raws:
            np.copyto(dst, np.frombuffer(r, np.uint8))

    rows = [
        (f"block_checksums, CRC-32 by {integrity.CRC32_IMPL}", "sender, gRPC request thread",
         crc_blocks),
        ("block_checksums, CRC-32 by zlib", "(without isal)", crc_blocks_zlib),
        (f"encode_chunks ({chunk // MIB} MiB: header + join)", "sender, gRPC request thread",
         encode),
        ("decode_chunk (no copy of data)", "receiver, gRPC handler", decode),
        ("DirectSink.write: copy into blocks + CRC-32", "receiver, gRPC handler", place),
        ("np.copyto of the payload", "(reference: one plain copy)", copy_ref),
    ]
    if integrity.CRC32_IMPL == "zlib":
        rows.pop(1)
    out = []
    for name, where, fn in rows:
        gbs = _rate(fn, total)
        out.append({"step": name, "where": where, "gb_s": gbs,
                    "ms_per_payload": total / gbs / 1e6})
    return out


# ----- profile: py-spy on both processes ----------------------------------------------------
def _category(frames: list[str]) -> str:
    stack, leaf = ";".join(frames), frames[-1]
    if "epoll_wait" in leaf or "Connection._recv" in stack:
        return "idle"
    if "PyThread_acquire_lock_timed" in stack and "libc.so" in leaf:
        return "idle"
    if "pthread_cond_timedwait" in stack or "_queue_SimpleQueue_get" in stack:
        return "idle"
    if "DirectSink.write" in stack or "StagedSink.write" in stack:
        return "placement (copy into reserved blocks, CRC-32 of the bytes)"
    if "crc32" in stack or "checksums" in stack:
        return "CRC-32 (block_checksums)"
    if "encode_chunks" in stack:
        return "encode_chunks (header + join copy)"
    if "decode_chunk" in stack:
        return "decode_chunk"
    if re.search(r"\b(sendmsg|write|read|recvmsg)\b", leaf):
        return "socket syscalls"
    if "cygrpc" in stack or "grpc/" in stack:
        if re.search(r"0x[0-9a-f]+8b[0-9a-f]{3} \(libc", leaf):
            return "gRPC memcpy (slices, message bytes)"
        return "gRPC other (thread hand-offs, GIL, C-core)"
    return "other"


def profile(layers, seconds: float, py_spy: str, torch_threads: int, chunk: int) -> dict:
    """Loop gRPC transfers while py-spy samples both processes (native
    frames); active samples by category."""
    import subprocess
    import tempfile

    path = KVPath("grpc", "grpc", "baton", layers, 2 * layers[0].shape[1], torch_threads, chunk)
    out: dict = {"transport": "grpc", "seconds": seconds}
    try:
        path.once()
        tmp = Path(tempfile.mkdtemp(prefix="kvprof-"))
        procs = {side: subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--native",
             "--threads", "--format", "raw", "-o", str(tmp / f"{side}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for side, pid in (("sender", os.getpid()), ("receiver", path.proc.pid))}
        n, t_end = 0, time.monotonic() + seconds + 1
        while time.monotonic() < t_end:
            path.once()
            n += 1
        for p in procs.values():
            p.wait(timeout=120)
        out["transfers"] = n
        for side in procs:
            cats: dict[str, int] = {}
            for line in (tmp / f"{side}.txt").read_text().splitlines():
                stack, _, cnt = line.rpartition(" ")
                c = _category(stack.split(";"))
                cats[c] = cats.get(c, 0) + int(cnt)
            cats.pop("idle", None)
            total = sum(cats.values()) or 1
            out[side] = {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
            out[side + "_active_samples"] = total
    finally:
        path.close()
    return out


# ----- main ------------------------------------------------------------------------
def make_layers(tokens: int, n_layers: int, device: str = "cpu"):
    import torch

    n_blocks = -(-tokens // BLOCK_SIZE)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, n_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g).to(device)
            for _ in range(n_layers)]


def summarize(label: str, runs: list[dict], total: int, tcp_median_gbs: float | None) -> dict:
    rates = [total / r["seconds"] / 1e9 for r in runs]
    med = statistics.median(rates)
    return {"path": label, "runs": len(runs), "gb_s_median": med, "gb_s_min": min(rates),
            "gb_s_max": max(rates),
            "ms_median": statistics.median(r["seconds"] for r in runs) * 1e3,
            "send_layer_ms_median": statistics.median(r["send_layer_s"] for r in runs) * 1e3,
            "cpu_send_ms_mean": statistics.fmean(r["cpu_send_s"] for r in runs) * 1e3,
            "cpu_recv_ms_mean": statistics.fmean(r["cpu_recv_s"] for r in runs) * 1e3,
            "ratio_to_raw_tcp": (med / tcp_median_gbs) if tcp_median_gbs else None,
            "raw_gb_s": rates}


def build_paths(args, layers, host_layers, say) -> list:
    from kvtransfer.grpc_transport import CHUNK_BYTES
    from kvtransfer.integrity import CRC32_IMPL

    chunk = int(args.chunk_mib * MIB) if args.chunk_mib else CHUNK_BYTES
    cache_blocks, threads = 2 * layers[0].shape[1], args.torch_threads
    # the raw peers move host memory: the ceiling of the wire between two processes
    paths = [TcpPath(host_layers, False, chunk, threads),
             TcpPath(host_layers, True, chunk, threads), GrpcFloorPath(host_layers, chunk)]
    for t in transports_to_run(args, say):
        paths.append(KVPath(t, t, "baton", layers, cache_blocks, threads, chunk))
    if args.what_if:
        for mib in (2, 4):
            paths.append(KVPath(f"grpc, {mib} MiB chunks", "grpc", "baton", layers,
                                cache_blocks, threads, mib * MIB))
        paths.append(KVPath("grpc, 16 KiB HTTP/2 frames (gRPC's default)", "grpc",
                            "frames16k", layers, cache_blocks, threads, chunk))
        if CRC32_IMPL == "isal":
            paths.append(KVPath("grpc, CRC-32 by zlib", "grpc", "zlib", layers, cache_blocks,
                                threads, chunk))
        else:
            say("  (isal not importable: Baton already uses zlib; no zlib what-if)")
    return paths


def transports_to_run(args, say) -> list[str]:
    """The transports asked for, less NCCL where the GPUs cannot form a pair."""
    import torch

    names = args.transports.split(",")
    if args.device.startswith("cuda") and "nccl" in names and torch.cuda.device_count() < 2:
        say("  nccl skipped: NCCL needs one GPU per rank and this machine has "
            f"{torch.cuda.device_count()}")
        names.remove("nccl")
    return names


def run_rounds(paths, layers, reps: int, total: int, say) -> dict[str, list[dict]]:
    # warm-up + correctness: the blocks that landed hold the sent bytes
    for p in paths:
        r = p.once()
        if isinstance(p, KVPath):
            want = zlib.crc32(layers[0][0].cpu().contiguous().numpy().tobytes())
            if p.check(r["block_ids"]) != want:
                raise RuntimeError(f"{p.label}: received KV differs from what was sent")
    runs: dict[str, list[dict]] = {p.label: [] for p in paths}
    for rnd in range(reps):
        k = rnd % len(paths)
        for p in paths[k:] + paths[:k]:  # rotate the order each round
            runs[p.label].append(p.once())
        say(f"  round {rnd + 1}/{reps}: " + ", ".join(
            f"{lbl} {total / rs[-1]['seconds'] / 1e9:.2f}" for lbl, rs in runs.items()))
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prompt tokens (16 KiB of KV each)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (>= 5)")
    ap.add_argument("--chunk-mib", type=float, default=0.0,
                    help="chunk size of gRPC and the TCP peers (default: Baton's CHUNK_BYTES)")
    ap.add_argument("--transports", default="grpc,nccl")
    ap.add_argument("--what-if", action="store_true",
                    help="also run Baton's gRPC with 2/4 MiB chunks, 16 KiB frames, zlib's CRC-32")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads per process (workers use 1)")
    ap.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                    help="also sample gRPC sender and receiver with py-spy for SECONDS")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy",
                    help="py-spy binary for --profile")
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write JSON to this file ('-' or no value: stdout)")
    ap.add_argument("--device", default="cpu",
                    help="where the sender's KV and the receiver's cache live: cpu or cuda "
                         "(the raw TCP and gRPC floor peers always move host memory)")
    args = ap.parse_args(argv)

    import torch

    from kvtransfer.grpc_transport import CHUNK_BYTES
    from kvtransfer.integrity import CRC32_IMPL

    torch.set_num_threads(args.torch_threads)
    layers = make_layers(args.tokens, args.layers, args.device)
    host_layers = layers if args.device == "cpu" else [b.cpu() for b in layers]
    total = sum(b.numel() * b.element_size() for b in layers)
    chunk = int(args.chunk_mib * MIB) if args.chunk_mib else CHUNK_BYTES
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json == "-" else \
        (lambda *a: print(*a, flush=True))
    say(f"payload: {args.tokens} tokens, {args.layers} layers x {tuple(layers[0].shape)} fp32 "
        f"on {args.device} = "
        f"{total / MIB:.0f} MiB; chunks {chunk / MIB:g} MiB; CRC-32 by {CRC32_IMPL}; "
        f"{args.reps} rounds after 1 warm-up; receivers in separate processes")
    paths = []
    try:
        paths = build_paths(args, layers, host_layers, say)
        runs = run_rounds(paths, layers, args.reps, total, say)
    finally:
        for p in paths:
            try:
                p.close()
            except Exception:  # noqa: BLE001 - best-effort teardown
                pass

    tcp = summarize("raw-tcp", runs["raw-tcp"], total, None)
    tcp["ratio_to_raw_tcp"] = 1.0
    rows = [tcp] + [summarize(lbl, rs, total, tcp["gb_s_median"])
                    for lbl, rs in runs.items() if lbl != "raw-tcp"]
    bd = [] if args.no_breakdown else breakdown(host_layers, chunk)
    prof = {}
    if args.profile > 0:
        say(f"profiling grpc for {args.profile:.0f} s with {args.py_spy} ...")
        prof = profile(host_layers, args.profile, args.py_spy, args.torch_threads, chunk)
    grpc_row = next((r for r in rows if r["path"] == "grpc"), None)
    report = {
        "benchmark": "kv_transfer", "date": time.strftime("%Y-%m-%d"),
        "machine": machine(args.device), "device": args.device,
        "kv_location": "GPU memory, both sides" if args.device != "cpu" else "host memory",
        "load_avg_1m": os.getloadavg()[0],
        "payload_bytes": total, "tokens": args.tokens, "layers": args.layers,
        "layer_shape": list(layers[0].shape), "dtype": "float32", "chunk_bytes": chunk,
        "crc32_impl": CRC32_IMPL, "reps": args.reps, "unit": "GB/s = 1e9 bytes/s",
        "paths": rows, "breakdown": bd, "profile": prof,
        "target": {"grpc_ratio_min": 0.70,
                   "grpc_ratio": grpc_row["ratio_to_raw_tcp"] if grpc_row else None,
                   "met": bool(grpc_row and grpc_row["ratio_to_raw_tcp"] >= 0.70)},
    }
    emit_report(report, args.json, print_tables)
    return 0


def print_profile(prof: dict) -> None:
    print(f"\npy-spy profile of {prof['transport']} ({prof['transfers']} transfers in "
          f"{prof['seconds']:.0f} s): share of ACTIVE samples (idle waits removed)")
    for side in ("sender", "receiver"):
        print(f"  {side} ({prof[side + '_active_samples']} samples)")
        for k, v in prof[side].items():
            print(f"    {v * 100:5.1f}%  {k}")


def print_tables(report: dict) -> None:
    total = report["payload_bytes"]
    print(f"\nKV transfer, {report['tokens']} tokens = {total / MIB:.0f} MiB ({report['layers']} "
          f"layers x {tuple(report['layer_shape'])} fp32), chunks "
          f"{report['chunk_bytes'] / MIB:g} MiB, CRC-32 by {report['crc32_impl']}, median of "
          f"{report['reps']} rounds (load average {report['load_avg_1m']:.1f})")
    head = (f"{'path':<30} {'GB/s p50':>9} {'min':>6} {'max':>6} {'ms p50':>8} "
            f"{'send_layer ms':>13} {'CPU ms snd':>10} {'CPU ms rcv':>10} {'vs raw TCP':>10}")
    print(head + "\n" + "-" * len(head))
    for r in report["paths"]:
        print(f"{r['path']:<30} {r['gb_s_median']:>9.2f} {r['gb_s_min']:>6.2f} "
              f"{r['gb_s_max']:>6.2f} {r['ms_median']:>8.1f} {r['send_layer_ms_median']:>13.1f} "
              f"{r['cpu_send_ms_mean']:>10.0f} {r['cpu_recv_ms_mean']:>10.0f} "
              f"{r['ratio_to_raw_tcp'] * 100:>9.0f}%")
    print("(CPU ms: user+sys of the sender process / the receiver process per transfer, "
          "mean; /proc tick resolution)")
    t = report["target"]
    if t["grpc_ratio"] is not None:
        print(f"target grpc >= 70% of raw TCP: {t['grpc_ratio'] * 100:.0f}% -> "
              f"{'MET' if t['met'] else 'MISSED'}")
    if report.get("profile"):
        print_profile(report["profile"])
    if report["breakdown"]:
        print(f"\nWhere the time goes (one thread, this process, best of 3, over the "
              f"{total / MIB:.0f} MiB payload)")
        head = f"{'step':<44} {'where':<30} {'GB/s':>6} {'ms':>7}"
        print(head + "\n" + "-" * len(head))
        for b in report["breakdown"]:
            print(f"{b['step']:<44} {b['where']:<30} {b['gb_s']:>6.2f} "
                  f"{b['ms_per_payload']:>7.1f}")


if __name__ == "__main__":
    raise SystemExit(main())

"""KV transfer throughput per transport, through Baton's real code path,
against a raw loopback TCP socket moving the same bytes in the same run.

Payload (default 64 MiB): one request's KV shaped like llama-60m's, fp32 —
per layer a buffer (2, n_blocks, 16, kv_heads=4, head_dim=64); 8 layers of
256 blocks (4096 tokens) sum to 64 MiB. Random contents.

Per transport (``grpc``, ``nccl`` = gloo on CPU) the decode side runs in a
SEPARATE PROCESS (multiprocessing spawn), as in production: it owns a paged
KV cache (twice the payload's blocks), a ``ReceiverCore`` over it and
``make_receiver(name, core)``. One timed transfer is exactly what a prefill
worker does for one request::

    receiver.expect(rid, block_ids)          # in the receiver process, untimed
    t0
    handle = make_sender(name).open(rid, endpoint, n_layers)
    handle.send_layer(l, buffer_l)  for each layer  (sender-side CRC-32 inside)
    result = handle.finish()                 # receiver verified every block
                                             # (CRC-32) and scattered it
    t1                                       # GB/s = payload bytes / (t1 - t0)

The peer, ``raw-tcp``, is a plain loopback TCP connection between two
processes: the sender ``sendall``s the same 64 MiB (a memoryview of the
tensors, no copy), the receiver ``recv_into``s a preallocated buffer (4 MiB
per call) and answers one byte; timed from the first byte handed over to the
ack. No checksum, no framing, no scatter: the ceiling of moving bytes
between processes on this machine.

Repetitions are interleaved (each round runs every transport once, in a
rotating order) so the load of this shared machine hits all of them alike;
one warm-up round first (it also opens the gRPC channel / gloo pair). We
report the median (and min/max) of ``--reps`` rounds, and each transport's
ratio to raw TCP *median of the same run*.

Where the time goes (``--breakdown``, on by default): single-threaded
throughput of each step the gRPC path performs on the payload, measured in
this process —
- ``block_checksums`` (CRC-32 per block; run once on the sender, once on the
  receiver), and plain ``zlib.crc32`` over the same bytes for comparison;
- sender: ``bytes(memoryview[off:off+chunk])`` (the chunk copy in
  ``_GrpcSendHandle._chunks``) and ``KVChunk.SerializeToString`` (what gRPC
  does with each message);
- receiver: ``KVChunk.FromString`` (protobuf parse of the message),
  ``np.frombuffer`` + slice assignment into the layer buffer
  (``ReceiverCore.on_bytes``), and ``scatter_kv_blocks`` into the cache.

``--what-if`` additionally runs variants of the gRPC path that are NOT
Baton's code (labelled as such): 4 MiB chunks (with the message limit raised
past 4 MiB on both sides, which Baton's 4 MiB limit would refuse), and
``block_checksums`` computed with ISA-L's ``crc32`` (``isal`` package, same
CRC-32 values) on both sides. They show what a fix would buy; the headline
numbers are always Baton's unmodified path.

``--profile SECONDS`` loops gRPC transfers while ``py-spy record --native``
samples the sender and the receiver process, and prints the share of active
samples per category (CRC, copies, gRPC hand-offs, syscalls).

Usage::

    python benchmarks/kv_transfer_bench.py                 # 64 MiB, 7 rounds
    python benchmarks/kv_transfer_bench.py --reps 9 --what-if --profile 10 --json out.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import shutil
import socket
import statistics
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

from bench_common import emit_report

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 4, 64  # llama-60m
MIB = 1 << 20


# ----- what-if variants (not Baton's code; only with --what-if) -------------------
def isal_block_checksums(buffer):
    """``block_checksums`` with ISA-L's CRC-32 (same polynomial, same values)."""
    from isal import isal_zlib

    planes = buffer.detach().cpu().contiguous()
    raw = planes.view(-1).view(torch_uint8()).view(2, planes.shape[1], -1).numpy()
    return [isal_zlib.crc32(raw[1, b], isal_zlib.crc32(raw[0, b]))
            for b in range(planes.shape[1])]


def torch_uint8():
    import torch

    return torch.uint8


def have_isal() -> bool:
    try:
        from isal import isal_zlib  # noqa: F401
    except ImportError:
        return False
    return True


def patch_receiver_variant(variant: str) -> None:
    """Receiver process of a what-if variant: patch the module before the server starts."""
    if variant == "isal":
        import kvtransfer.base

        kvtransfer.base.block_checksums = isal_block_checksums
    if variant == "chunk4m":
        from kvtransfer import grpc_transport as gt

        # 4 MiB of data per message plus header fields exceeds Baton's 4 MiB limit.
        gt._OPTIONS[:] = [("grpc.max_receive_message_length", 8 * MIB),
                          ("grpc.max_send_message_length", 8 * MIB)]


def make_variant_sender(transport: str, variant: str):
    from kvtransfer import make_sender

    if variant in ("baton", "isal"):
        return make_sender(transport)  # isal: patched around each transfer in once()
    import grpc

    from kvtransfer import grpc_transport as gt
    from proto.baton.v1 import kv_transfer_pb2_grpc as pb_grpc

    if variant == "chunk4m":
        class Sender(gt.GrpcKVSender):
            def _stub(self, endpoint):
                if endpoint not in self._stubs:
                    ch = grpc.insecure_channel(endpoint, options=[
                        ("grpc.max_receive_message_length", 8 * MIB),
                        ("grpc.max_send_message_length", 8 * MIB)])
                    self._channels.append(ch)
                    self._stubs[endpoint] = pb_grpc.KVTransferStub(ch)
                return self._stubs[endpoint]
        return Sender(chunk_bytes=4 * MIB)
    raise ValueError(variant)


# ----- receiver process ------------------------------------------------------------
def kv_receiver_main(conn, transport: str, variant: str, cache_blocks: int, n_layers: int,
                     torch_threads: int) -> None:
    """Decode side: a KV cache, a ReceiverCore and Baton's receiver; commands
    come over ``conn``."""
    import torch

    torch.set_num_threads(torch_threads)
    patch_receiver_variant(variant)
    from kvtransfer import make_receiver
    from kvtransfer.base import ReceiverCore

    data = torch.zeros(n_layers, 2, cache_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
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
            ids = torch.tensor(cmd[1])
            conn.send(("crc", zlib.crc32(data[0, 0, ids].contiguous().numpy().tobytes())))
        elif cmd[0] == "stop":
            receiver.close()
            conn.send(("bye",))
            return


def tcp_receiver_main(conn, layer_shape: tuple, n_layers: int, verified: bool,
                      recv_chunk: int, torch_threads: int) -> None:
    """Raw TCP peer: accept one connection; per transfer recv_into a
    preallocated buffer and answer one byte. ``verified``: per layer, also
    read the sender's block CRCs, recompute ``block_checksums`` on the layer
    and scatter it into a KV cache, like ``ReceiverCore`` (no gRPC, no copy
    into an intermediate buffer)."""
    import torch

    torch.set_num_threads(torch_threads)
    from kernels import scatter_kv_blocks
    from kvtransfer.integrity import block_checksums

    layer_bytes = 4
    for d in layer_shape:
        layer_bytes *= d
    n_blocks = layer_shape[1]
    bufs = [torch.empty(layer_shape) for _ in range(n_layers)]
    views = [memoryview(b.view(-1).view(torch.uint8).numpy()) for b in bufs]
    if verified:
        cache = torch.zeros(n_layers, 2, 2 * n_blocks, *layer_shape[2:])
        ids = torch.randperm(2 * n_blocks)[:n_blocks]
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conn.send(("endpoint", srv.getsockname()[1]))
    s, _ = srv.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        if _recv_exact(s, 8) is None:  # start of a transfer
            return
        for layer in range(n_layers):
            if verified:
                crcs = struct.unpack(f"!{n_blocks}I", _recv_exact(s, 4 * n_blocks))
            view, got = views[layer], 0
            while got < layer_bytes:
                k = s.recv_into(view[got:min(layer_bytes, got + recv_chunk)])
                if k == 0:
                    return
                got += k
            if verified:
                if tuple(block_checksums(bufs[layer])) != crcs:
                    raise RuntimeError("raw-tcp+crc: checksum mismatch")
                scatter_kv_blocks(bufs[layer], cache[layer, 0], cache[layer, 1], ids)
        s.sendall(b"\x01")


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        part = s.recv(n - len(out))
        if not part:
            return None
        out += part
    return out


# ----- sender side (this process) ----------------------------------------------------
class KVPath:
    """One transport (or what-if variant): a receiver process plus a sender here."""

    def __init__(self, label: str, transport: str, variant: str, layers, cache_blocks: int,
                 torch_threads: int):
        ctx = mp.get_context("spawn")
        self.label, self.transport, self.variant = label, transport, variant
        self.layers = layers
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=kv_receiver_main, daemon=True, args=(
            child, transport, variant, cache_blocks, len(layers), torch_threads))
        self.proc.start()
        _, self.endpoint = self.conn.recv()
        self.sender = None  # built lazily so variants patch before creation
        self.n = 0
        self.n_blocks = layers[0].shape[1]
        self.cache_blocks = cache_blocks

    def once(self) -> dict:
        import random

        if self.sender is None:
            self.sender = make_variant_sender(self.transport, self.variant)
        self.n += 1
        rid = f"{self.label}-{self.n}"
        block_ids = random.Random(self.n).sample(range(self.cache_blocks), self.n_blocks)
        self.conn.send(("expect", rid, block_ids))
        self.conn.recv()
        import kvtransfer.sender as ks

        saved = ks.block_checksums
        if self.variant == "isal":
            ks.block_checksums = isal_block_checksums
        try:
            cpu0 = cpu_s(os.getpid()), cpu_s(self.proc.pid)
            t0 = time.perf_counter()
            handle = self.sender.open(rid, self.endpoint, len(self.layers))
            for i, buf in enumerate(self.layers):
                handle.send_layer(i, buf)
            t_sent = time.perf_counter()
            result = handle.finish()
            t1 = time.perf_counter()
            cpu1 = cpu_s(os.getpid()), cpu_s(self.proc.pid)
        finally:
            ks.block_checksums = saved
        self.conn.send(("take", rid))
        _, state, nbytes = self.conn.recv()
        if not result.ok or state != "success":
            raise RuntimeError(f"{self.label}: transfer failed: {result.error} ({state})")
        return {"seconds": t1 - t0, "send_layer_s": t_sent - t0, "bytes": nbytes,
                "attempts": result.attempts, "block_ids": block_ids,
                "cpu_send_s": cpu1[0] - cpu0[0], "cpu_recv_s": cpu1[1] - cpu0[1]}

    def check(self, block_ids) -> int:
        self.conn.send(("check", block_ids))
        return self.conn.recv()[1]

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self.conn.send(("stop",))
        self.conn.recv()
        self.proc.join(5)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TcpPath:
    """Raw TCP between two processes; ``verified`` adds Baton's integrity work
    (block CRC-32 on both sides, scatter into the cache) on top of plain TCP."""

    def __init__(self, layers, verified: bool, recv_chunk: int, torch_threads: int):
        import torch

        ctx = mp.get_context("spawn")
        self.label = "raw-tcp+crc+scatter" if verified else "raw-tcp"
        self.layers, self.verified = layers, verified
        self.views = [memoryview(b.view(-1).view(torch.uint8).numpy()) for b in layers]
        self.total = sum(len(v) for v in self.views)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=tcp_receiver_main, daemon=True, args=(
            child, tuple(layers[0].shape), len(layers), verified, recv_chunk, torch_threads))
        self.proc.start()
        _, port = self.conn.recv()
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def once(self) -> dict:
        import queue

        from kvtransfer.integrity import block_checksums

        cpu0 = cpu_s(os.getpid()), cpu_s(self.proc.pid)
        t0 = time.perf_counter()
        if not self.verified:
            self.s.sendall(struct.pack("!Q", self.total))
            for v in self.views:
                self.s.sendall(v)
        else:  # checksums computed here while a thread sends the previous layer
            q: queue.Queue = queue.Queue()

            def pump():
                while (item := q.get()) is not None:
                    self.s.sendall(item)
            th = threading.Thread(target=pump)
            th.start()
            q.put(struct.pack("!Q", self.total))
            for b, v in zip(self.layers, self.views, strict=True):
                crcs = block_checksums(b)
                q.put(struct.pack(f"!{len(crcs)}I", *crcs))
                q.put(v)
            q.put(None)
            th.join()
        t_sent = time.perf_counter()
        if self.s.recv(1) != b"\x01":
            raise RuntimeError(f"{self.label}: no ack")
        t1 = time.perf_counter()
        cpu1 = cpu_s(os.getpid()), cpu_s(self.proc.pid)
        return {"seconds": t1 - t0, "send_layer_s": t_sent - t0, "bytes": self.total,
                "cpu_send_s": cpu1[0] - cpu0[0], "cpu_recv_s": cpu1[1] - cpu0[1]}

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

    from kernels import scatter_kv_blocks
    from kvtransfer.integrity import block_checksums
    from kvtransfer.sender import byte_view
    from proto.baton.v1 import kv_transfer_pb2 as pb

    total = sum(b.numel() * b.element_size() for b in layers)
    raws = [byte_view(b) for b in layers]
    n_blocks = layers[0].shape[1]

    def crc_blocks():
        for b in layers:
            block_checksums(b)

    def crc_plain():
        for r in raws:
            zlib.crc32(r)

    def chunk_copy():
        for r in raws:
            for off in range(0, len(r), chunk):
                bytes(r[off:off + chunk])

    msgs = [pb.KVChunk(request_id="r", layer=i, offset=off, layer_bytes=len(r),
                       data=bytes(r[off:off + chunk]))
            for i, r in enumerate(raws) for off in range(0, len(r), chunk)]

    def serialize():
        for m in msgs:
            m.SerializeToString()

    wires = [m.SerializeToString() for m in msgs]

    def parse():
        for w in wires:
            pb.KVChunk.FromString(w)

    parsed = [pb.KVChunk.FromString(w) for w in wires]
    dst = torch.empty_like(layers[0])
    flat = dst.view(-1).view(torch.uint8).numpy()

    def place():
        for m in parsed:
            src = np.frombuffer(m.data, np.uint8)
            flat[m.offset:m.offset + src.size] = src

    cache = torch.zeros(2, 2 * n_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    ids = torch.randperm(2 * n_blocks)[:n_blocks]

    def scatter():
        for b in layers:
            scatter_kv_blocks(b, cache[0], cache[1], ids)

    rows = [
        ("block_checksums (CRC-32 per block)", "sender + receiver, each", crc_blocks),
        ("zlib.crc32 over whole layers", "(reference: no per-block split)", crc_plain),
        (f"bytes(memoryview slice) {chunk // MIB} MiB", "sender, gRPC chunking", chunk_copy),
        ("KVChunk.SerializeToString", "sender, gRPC message", serialize),
        ("KVChunk.FromString (parse)", "receiver, gRPC message", parse),
        ("np.frombuffer + slice assign", "receiver, ReceiverCore.on_bytes", place),
        ("scatter_kv_blocks into cache", "receiver, verified layer", scatter),
    ]
    out = []
    for name, where, fn in rows:
        gbs = _rate(fn, total)
        out.append({"step": name, "where": where, "gb_s": gbs,
                    "ms_per_payload": total / gbs / 1e6})
    return out


# ----- profile: py-spy on both processes ----------------------------------------------------
_IDLE_LEAVES = ("epoll_wait",)


def _category(frames: list[str]) -> str:
    stack, leaf = ";".join(frames), frames[-1]
    if "epoll_wait" in leaf or "Connection._recv" in stack:
        return "idle"
    if "PyThread_acquire_lock_timed" in stack and "libc.so" in leaf:
        return "idle"
    if "pthread_cond_timedwait" in stack or "_queue_SimpleQueue_get" in stack:
        return "idle"
    if "crc32" in stack:
        return "CRC-32 (zlib, block_checksums)"
    if "scatter_kv_blocks" in stack:
        return "scatter_kv_blocks (copy into cache)"
    if "ReceiverCore.on_bytes" in stack or "raw_array_assign" in stack:
        return "ReceiverCore.on_bytes (copy into layer buffer)"
    if "_chunks" in stack:
        return "sender _chunks (bytes(slice) copy, KVChunk build)"
    if re.search(r"\b(sendmsg|write|read|recvmsg)\b", leaf):
        return "socket syscalls"
    if "cygrpc" in stack or "grpc/" in stack:
        if re.search(r"0x[0-9a-f]+8b[0-9a-f]{3} \(libc", leaf):
            return "gRPC memcpy (serialize, byte buffers, parse)"
        return "gRPC other (thread hand-offs, GIL, C-core)"
    return "other"


def profile(transport: str, layers, seconds: float, py_spy: str, torch_threads: int) -> dict:
    """Loop transfers over ``transport`` while py-spy samples both processes
    (native frames); active samples by category."""
    import subprocess
    import tempfile

    path = KVPath(transport, transport, "baton", layers, 2 * layers[0].shape[1], torch_threads)
    out: dict = {"transport": transport, "seconds": seconds}
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
def make_layers(total_mib: int, n_layers: int):
    import torch

    per_block = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 4  # K and V, fp32
    n_blocks = total_mib * MIB // (n_layers * per_block)
    if n_blocks < 1:
        raise SystemExit("payload too small for the layer count")
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, n_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="payload size (MiB)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (>= 5)")
    ap.add_argument("--transports", default="grpc,nccl")
    ap.add_argument("--what-if", action="store_true",
                    help="also run a NOT-Baton gRPC variant (4 MiB chunks)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads per process (workers use 1)")
    ap.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                    help="also sample gRPC sender and receiver with py-spy for SECONDS")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy",
                    help="py-spy binary for --profile")
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write JSON to this file ('-' or no value: stdout)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    layers = make_layers(args.mib, args.layers)
    total = sum(b.numel() * b.element_size() for b in layers)
    n_blocks = layers[0].shape[1]
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json == "-" else \
        (lambda *a: print(*a, flush=True))
    say(f"payload: {args.layers} layers x {tuple(layers[0].shape)} fp32 = {total / MIB:.0f} MiB; "
        f"{args.reps} rounds after 1 warm-up; receivers in separate processes")

    paths = []
    try:
        paths.append(TcpPath(layers, False, 4 * MIB, args.torch_threads))
        paths.append(TcpPath(layers, True, 4 * MIB, args.torch_threads))
        for t in args.transports.split(","):
            paths.append(KVPath(t, t, "baton", layers, 2 * n_blocks, args.torch_threads))
        if args.what_if:
            paths.append(KVPath("grpc[what-if chunk 4MiB]", "grpc", "chunk4m", layers,
                                2 * n_blocks, args.torch_threads))
            if have_isal():
                paths.append(KVPath("grpc[what-if ISA-L crc32]", "grpc", "isal", layers,
                                    2 * n_blocks, args.torch_threads))
            else:
                say("  (isal not importable: skipping the ISA-L CRC what-if)")
        # warm-up + correctness: the blocks that landed hold the sent bytes
        for p in paths:
            r = p.once()
            if isinstance(p, KVPath):
                ids = r["block_ids"]
                want = zlib.crc32(layers[0][0].contiguous().numpy().tobytes())
                if p.check(ids) != want:
                    raise RuntimeError(f"{p.label}: received KV differs from what was sent")
        runs: dict[str, list[dict]] = {p.label: [] for p in paths}
        for rnd in range(args.reps):
            k = rnd % len(paths)
            for p in paths[k:] + paths[:k]:  # rotate the order each round
                runs[p.label].append(p.once())
            say(f"  round {rnd + 1}/{args.reps}: " + ", ".join(
                f"{lbl} {total / rs[-1]['seconds'] / 1e9:.2f}" for lbl, rs in runs.items()))
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
    bd = [] if args.no_breakdown else breakdown(layers, 1 * MIB)
    prof = {}
    if args.profile > 0:
        say(f"profiling grpc for {args.profile:.0f} s with {args.py_spy} ...")
        prof = profile("grpc", layers, args.profile, args.py_spy, args.torch_threads)
    grpc_row = next((r for r in rows if r["path"] == "grpc"), None)
    report = {
        "benchmark": "kv_transfer", "date": time.strftime("%Y-%m-%d"),
        "machine": f"CPU, {os.cpu_count()} cores, no GPU ({platform.processor() or platform.machine()})",
        "payload_bytes": total, "layers": args.layers, "layer_shape": list(layers[0].shape),
        "dtype": "float32", "reps": args.reps, "unit": "GB/s = 1e9 bytes/s",
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
    print(f"\nKV transfer, {total / MIB:.0f} MiB ({report['layers']} layers x "
          f"{tuple(report['layer_shape'])} fp32), median of {report['reps']} rounds")
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
        head = f"{'step':<38} {'where':<34} {'GB/s':>6} {'ms':>7}"
        print(head + "\n" + "-" * len(head))
        for b in report["breakdown"]:
            print(f"{b['step']:<38} {b['where']:<34} {b['gb_s']:>6.2f} "
                  f"{b['ms_per_payload']:>7.1f}")


if __name__ == "__main__":
    raise SystemExit(main())

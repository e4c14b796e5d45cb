"""KV transfer over gRPC: raw bytes in ~1 MiB chunks, works everywhere.

Lifecycle: each decode worker starts a ``GrpcKVReceiver`` (a gRPC server on a
free port, threads from a pool) at start-up and advertises its endpoint.
A prefill worker's ``GrpcKVSender`` keeps one channel per endpoint; each
transfer is one client-streaming ``Push`` call whose request iterator yields
chunks as layers are handed over, so bytes flow while later layers compute.
The server replies once the stream ends, after every layer is verified.
Nothing is unpickled: chunks are protobuf messages carrying raw bytes.
"""

from __future__ import annotations

import queue
from concurrent import futures

import grpc
import torch

from kvtransfer.base import KVReceiver, KVSender, LayerHeader, ReceiverCore
from kvtransfer.sender import FaultPlan, RetryingSendHandle, byte_view
from proto.baton.v1 import kv_transfer_pb2 as pb
from proto.baton.v1 import kv_transfer_pb2_grpc as pb_grpc

CHUNK_BYTES = 1 << 20
_MAX_MESSAGE = 4 << 20
_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE)]


class _KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(self, core: ReceiverCore):
        self.core = core

    def Push(self, request_iterator, context):  # noqa: N802 - gRPC method name
        request_id = ""
        try:
            for chunk in request_iterator:
                if not request_id:
                    request_id = chunk.request_id
                    if not self.core.begin_attempt(request_id, chunk.attempt):
                        context.abort(grpc.StatusCode.NOT_FOUND,
                                      f"no transfer expected for request {request_id!r}")
                header = _header(chunk) if chunk.offset == 0 else None
                self.core.on_bytes(header, request_id, chunk.layer, chunk.offset, chunk.data)
        except (ValueError, KeyError, RuntimeError) as exc:
            self.core.fail(request_id, f"bad stream: {exc}")
        ok, corrupt, nbytes, error = self.core.verdict(request_id)
        if not ok:
            self.core.fail(request_id, error)
        return pb.PushReply(request_id=request_id, ok=ok, corrupt_layers=corrupt,
                            bytes_received=nbytes, error=error)


def _header(chunk: pb.KVChunk) -> LayerHeader:
    return LayerHeader(chunk.request_id, chunk.attempt, chunk.layer, chunk.num_layers,
                       tuple(chunk.shape), chunk.dtype, tuple(chunk.block_crc32))


class GrpcKVReceiver(KVReceiver):
    name = "grpc"

    def __init__(self, core: ReceiverCore, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 8):
        self.core = core
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers), options=_OPTIONS)
        pb_grpc.add_KVTransferServicer_to_server(_KVTransferServicer(core), self._server)
        self._port = self._server.add_insecure_port(f"{host}:{port}")
        if self._port == 0:
            raise RuntimeError(f"could not bind the KV receiver to {host}:{port}")
        self._host = host
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self._port}"

    def close(self) -> None:
        self._server.stop(grace=1.0)


class _GrpcSendHandle(RetryingSendHandle):
    def __init__(self, stub, request_id: str, num_layers: int, chunk_bytes: int,
                 faults: FaultPlan, timeout_s: float):
        super().__init__(request_id, num_layers, faults)
        self._stub, self._chunk, self._timeout = stub, chunk_bytes, timeout_s
        self._start_call()

    def _start_call(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._call = self._stub.Push.future(self._chunks(self._queue), timeout=self._timeout)

    def _chunks(self, q: queue.Queue):
        while (item := q.get()) is not None:
            header, buffer = item
            raw = byte_view(buffer)
            for off in range(0, len(raw), self._chunk):
                msg = pb.KVChunk(request_id=header.request_id, attempt=header.attempt,
                                 layer=header.layer, offset=off, layer_bytes=len(raw),
                                 data=bytes(raw[off:off + self._chunk]))
                if off == 0:
                    msg.block_crc32.extend(header.block_crc32)
                    msg.shape.extend(header.shape)
                    msg.dtype, msg.num_layers = header.dtype, header.num_layers
                yield msg

    def _transmit(self, header: LayerHeader, buffer: torch.Tensor) -> None:
        self._queue.put((header, buffer.cpu()))

    def _verdict(self, timeout_s: float) -> tuple[bool, str]:
        self._queue.put(None)
        try:
            reply = self._call.result(timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"gRPC {exc.code().name}: {exc.details()}"
        return reply.ok, reply.error

    def _restart(self) -> None:
        self._start_call()


class GrpcKVSender(KVSender):
    name = "grpc"

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, timeout_s: float = 120.0):
        self.chunk_bytes, self.timeout_s = chunk_bytes, timeout_s
        self.faults = FaultPlan()
        self._stubs: dict[str, pb_grpc.KVTransferStub] = {}
        self._channels: list[grpc.Channel] = []

    def open(self, request_id: str, endpoint: str, num_layers: int) -> _GrpcSendHandle:
        return _GrpcSendHandle(self._stub(endpoint), request_id, num_layers, self.chunk_bytes,
                               self.faults, self.timeout_s)

    def _stub(self, endpoint: str) -> pb_grpc.KVTransferStub:
        if endpoint not in self._stubs:
            channel = grpc.insecure_channel(endpoint, options=_OPTIONS)
            self._channels.append(channel)
            self._stubs[endpoint] = pb_grpc.KVTransferStub(channel)
        return self._stubs[endpoint]

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._stubs.clear()

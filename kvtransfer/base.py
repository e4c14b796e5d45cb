"""The KV transfer interface: a sender on the prefill worker, a receiver on the
decode worker, and a polled state per transfer.

Lifecycle of one transfer (one request, all layers)::

    decode worker: receiver.expect(request_id, block_ids)   BOOTSTRAPPING
    prefill worker: handle = sender.open(request_id, endpoint, num_layers)
                    handle.send_layer(l, buffer) as each layer finishes
                                                            TRANSFERRING
    receiver: bytes land straight in the reserved blocks; each complete
              layer is checked there (CRC-32 per block); when all layers
              are in                                        SUCCESS | FAILED
    prefill worker: handle.finish() -> TransferResult (retries once on FAILED)
    decode worker: receiver.take(request_id) -> ReceiveResult

Backends are sibling modules (``grpc_transport``, ``nccl_transport``,
``local_transport``); they move bytes, and share ``ReceiverCore`` for
placement and verification (``placement``), so no backend can admit
unverified KV.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtransfer.placement import LayerSink, as_bytes, make_sink

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"  # blocks reserved, nothing arrived yet
    TRANSFERRING = "transferring"  # some layers in
    SUCCESS = "success"  # every layer in and verified
    FAILED = "failed"  # a checksum mismatch, a short stream, or an error


@dataclass(frozen=True)
class LayerHeader:
    """What the receiver needs to place one layer buffer."""

    request_id: str
    attempt: int  # 1, or 2 for the retry
    layer: int
    num_layers: int
    shape: tuple[int, ...]  # (2, num_blocks, block_size, num_kv_heads, head_dim)
    dtype: str
    block_crc32: tuple[int, ...]  # one per block

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class TransferResult:
    """The sender's view once a transfer is over."""

    request_id: str
    ok: bool
    attempts: int
    bytes_sent: int
    seconds: float  # from the first layer handed over to the receiver's verdict
    error: str = ""


@dataclass(frozen=True)
class ReceiveResult:
    """The receiver's view of a finished transfer."""

    request_id: str
    state: TransferState
    bytes_received: int
    corrupt_layers: tuple[int, ...]
    layer_arrival_s: tuple[float, ...]  # wall-clock time each layer was verified
    error: str = ""


@dataclass
class TransferMetrics:
    """Counters per transport, exported as Prometheus metrics by the worker."""

    transport: str
    bytes_total: int = 0
    seconds_total: float = 0.0
    transfers_total: int = 0
    failures_total: dict[str, int] = field(default_factory=dict)  # reason -> count

    def record(self, result: TransferResult) -> None:
        self.transfers_total += 1
        self.bytes_total += result.bytes_sent
        self.seconds_total += result.seconds
        if result.attempts > 1 or not result.ok:
            reason = "checksum" if "checksum" in result.error or result.attempts > 1 else "error"
            self.failures_total[reason] = self.failures_total.get(reason, 0) + 1


class SendHandle(ABC):
    """One request's outgoing transfer."""

    @abstractmethod
    def send_layer(self, layer: int, buffer: torch.Tensor) -> None:
        """Hand over a layer buffer (returns at once; bytes move in the background)."""

    @abstractmethod
    def finish(self, timeout_s: float = 60.0) -> TransferResult:
        """Wait for the receiver's verdict; retries the whole transfer once."""


class KVSender(ABC):
    name: str

    @abstractmethod
    def open(self, request_id: str, endpoint: str, num_layers: int) -> SendHandle: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class KVReceiver(ABC):
    """Decode-side half: owns a ``ReceiverCore`` writing into the KV cache."""

    name: str
    core: ReceiverCore

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where senders reach this receiver."""

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        self.core.expect(request_id, block_ids)

    def state(self, request_id: str) -> TransferState | None:
        return self.core.state(request_id)

    def take(self, request_id: str) -> ReceiveResult | None:
        return self.core.take(request_id)

    def wait(self, request_id: str, timeout_s: float) -> TransferState | None:
        return self.core.wait(request_id, timeout_s)

    def cancel(self, request_id: str) -> None:
        self.core.take(request_id)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop serving."""


@dataclass
class _LayerIn:
    """A layer being received: its header, where its bytes go, how many came."""

    header: LayerHeader
    sink: LayerSink
    got: int = 0


@dataclass
class _Incoming:
    block_ids: list[int]
    attempt: int = 0
    num_layers: int = 0
    layers: dict[int, _LayerIn] = field(default_factory=dict)
    done_layers: set[int] = field(default_factory=set)
    corrupt: set[int] = field(default_factory=set)
    arrivals: list[float] = field(default_factory=list)
    bytes: int = 0
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str = ""
    # Held while bytes are written into the reserved blocks; ``closed`` (set
    # under it once the transfer is taken or superseded) stops any late write.
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


class ReceiverCore:
    """Places byte ranges of layer buffers straight into the reserved blocks,
    verifies every block's checksum once a layer is complete, and keeps the
    state of each expected transfer."""

    def __init__(self, kv_layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv_layers = kv_layers  # per layer (k_cache, v_cache)
        self._incoming: dict[str, _Incoming] = {}
        self._cond = threading.Condition()

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        with self._cond:
            old = self._incoming.get(request_id)
            self._incoming[request_id] = _Incoming(list(block_ids))
        _close(old)

    def state(self, request_id: str) -> TransferState | None:
        with self._cond:
            inc = self._incoming.get(request_id)
            return inc.state if inc else None

    def wait(self, request_id: str, timeout_s: float) -> TransferState | None:
        """Block until the transfer succeeds or fails (or the timeout passes)."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                inc = self._incoming.get(request_id)
                if inc is None or inc.state in (TransferState.SUCCESS, TransferState.FAILED):
                    return inc.state if inc else None
                left = end - time.monotonic()
                if left <= 0:
                    return inc.state
                self._cond.wait(left)

    def take(self, request_id: str) -> ReceiveResult | None:
        """Forget the transfer; once this returns, nothing more is written to its blocks."""
        with self._cond:
            inc = self._incoming.pop(request_id, None)
        if inc is None:
            return None
        _close(inc)
        return ReceiveResult(request_id, inc.state, inc.bytes, tuple(sorted(inc.corrupt)),
                             tuple(inc.arrivals), inc.error)

    def begin_attempt(self, request_id: str, attempt: int) -> bool:
        """Reset progress for a retry; False if the request is not expected."""
        with self._cond:
            inc = self._incoming.get(request_id)
            if inc is None:
                return False
            if attempt == inc.attempt:
                return True
            self._incoming[request_id] = _Incoming(inc.block_ids, attempt=attempt)
        _close(inc)
        return True

    def on_bytes(self, header: LayerHeader | None, request_id: str, layer: int,
                 offset: int, data: memoryview | bytes | torch.Tensor | np.ndarray) -> None:
        """A byte range of a layer buffer (the header comes with the first range)."""
        with self._cond:
            inc = self._incoming.get(request_id)
        if inc is None:
            raise KeyError(f"no transfer expected for request {request_id!r}")
        with inc.lock:
            if inc.closed or inc.state is TransferState.FAILED:
                return  # taken, superseded or failed: drop the rest of this attempt
            if header is not None:
                self._start_layer(inc, header)
            if inc.state is not TransferState.FAILED:
                self._write(inc, layer, offset, as_bytes(data))

    def _write(self, inc: _Incoming, layer: int, offset: int, src: np.ndarray) -> None:
        lay = inc.layers.get(layer)
        if lay is None:
            self._fail(inc, f"layer {layer}: bytes before the layer's header")
            return
        if offset < 0 or offset + src.size > lay.header.nbytes:
            self._fail(inc, f"layer {layer}: bytes past the end of the buffer")
            return
        lay.sink.write(offset, src)
        lay.got += src.size
        if lay.got == lay.header.nbytes:
            self._complete_layer(inc, layer)

    def _start_layer(self, inc: _Incoming, header: LayerHeader) -> None:
        n_blocks = header.shape[1] if len(header.shape) == 5 else -1
        if n_blocks != len(inc.block_ids) or header.dtype not in DTYPES:
            self._fail(inc, f"layer {header.layer}: shape {header.shape} does not fit "
                            f"{len(inc.block_ids)} reserved blocks")
            return
        if not 0 <= header.layer < len(self.kv_layers):
            self._fail(inc, f"layer {header.layer}: this cache has {len(self.kv_layers)} layers")
            return
        k_cache, v_cache = self.kv_layers[header.layer]
        block_shape, dtype = tuple(k_cache.shape[1:]), DTYPES[header.dtype]
        if tuple(header.shape[2:]) != block_shape or dtype != k_cache.dtype:
            self._fail(inc, f"layer {header.layer}: blocks {tuple(header.shape[2:])} "
                            f"{header.dtype} do not fit the cache's {block_shape} "
                            f"{DTYPE_NAMES.get(k_cache.dtype, k_cache.dtype)}")
            return
        inc.num_layers = header.num_layers
        inc.state = TransferState.TRANSFERRING
        sink = make_sink(k_cache, v_cache, inc.block_ids, header.shape, dtype)
        inc.layers[header.layer] = _LayerIn(header, sink)

    def _complete_layer(self, inc: _Incoming, layer: int) -> None:
        lay = inc.layers.pop(layer)
        inc.bytes += lay.got
        if not lay.sink.finish(lay.header.block_crc32):
            inc.corrupt.add(layer)
        inc.done_layers.add(layer)
        inc.arrivals.append(time.time())
        if len(inc.done_layers) == inc.num_layers:
            with self._cond:
                inc.state = TransferState.FAILED if inc.corrupt else TransferState.SUCCESS
                if inc.corrupt:
                    inc.error = f"checksum mismatch in layers {sorted(inc.corrupt)}"
                self._cond.notify_all()

    def _fail(self, inc: _Incoming, error: str) -> None:
        with self._cond:
            inc.state, inc.error = TransferState.FAILED, error
            self._cond.notify_all()

    def fail(self, request_id: str, error: str) -> None:
        """Mark a transfer failed (stream broke off, peer died)."""
        with self._cond:
            inc = self._incoming.get(request_id)
        if inc is not None and inc.state is not TransferState.SUCCESS:
            self._fail(inc, error)

    def verdict(self, request_id: str) -> tuple[bool, tuple[int, ...], int, str]:
        """(ok, corrupt layers, bytes, error) for the sender's reply."""
        with self._cond:
            inc = self._incoming.get(request_id)
            if inc is None:
                return False, (), 0, f"no transfer expected for request {request_id!r}"
            ok = inc.state is TransferState.SUCCESS
            error = inc.error or ("" if ok else f"incomplete: {len(inc.done_layers)} of "
                                               f"{inc.num_layers} layers")
            return ok, tuple(sorted(inc.corrupt)), inc.bytes, error


def _close(inc: _Incoming | None) -> None:
    """Wait for a write in progress, then refuse any later one."""
    if inc is not None:
        with inc.lock:
            inc.closed = True

"""The KV transfer interface: a sender on the prefill worker, a receiver on the
decode worker, and a polled state per transfer.

Lifecycle of one transfer (one request, all layers)::

    decode worker: receiver.expect(request_id, block_ids)   BOOTSTRAPPING
    prefill worker: handle = sender.open(request_id, endpoint, num_layers)
                    handle.send_layer(l, buffer) as each layer finishes
                                                            TRANSFERRING
    receiver: each complete layer is checked (CRC-32 per block) and scattered
              into the reserved blocks; when all layers are in
                                                            SUCCESS | FAILED
    prefill worker: handle.finish() -> TransferResult (retries once on FAILED)
    decode worker: receiver.take(request_id) -> ReceiveResult

Backends are sibling modules (``grpc_transport``, ``nccl_transport``,
``local_transport``); they move bytes, and share ``ReceiverCore`` for
reassembly, verification and scattering, so no backend can admit unverified KV.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from kernels import scatter_kv_blocks
from kvtransfer.integrity import block_checksums

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
class _Incoming:
    block_ids: list[int]
    attempt: int = 0
    num_layers: int = 0
    buffers: dict[int, tuple[LayerHeader, torch.Tensor, int]] = field(default_factory=dict)
    done_layers: set[int] = field(default_factory=set)
    corrupt: set[int] = field(default_factory=set)
    arrivals: list[float] = field(default_factory=list)
    bytes: int = 0
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str = ""


class ReceiverCore:
    """Reassembles layer buffers from byte ranges, verifies every block's
    checksum and scatters verified layers into the reserved blocks."""

    def __init__(self, kv_layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv_layers = kv_layers  # per layer (k_cache, v_cache)
        self._incoming: dict[str, _Incoming] = {}
        self._cond = threading.Condition()

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        with self._cond:
            self._incoming[request_id] = _Incoming(list(block_ids))

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
        with self._cond:
            inc = self._incoming.pop(request_id, None)
        if inc is None:
            return None
        return ReceiveResult(request_id, inc.state, inc.bytes, tuple(sorted(inc.corrupt)),
                             tuple(inc.arrivals), inc.error)

    def begin_attempt(self, request_id: str, attempt: int) -> bool:
        """Reset progress for a retry; False if the request is not expected."""
        with self._cond:
            inc = self._incoming.get(request_id)
            if inc is None:
                return False
            if attempt != inc.attempt:
                self._incoming[request_id] = _Incoming(inc.block_ids, attempt=attempt)
            return True

    def on_bytes(self, header: LayerHeader | None, request_id: str, layer: int,
                 offset: int, data: memoryview | bytes | torch.Tensor) -> None:
        """A byte range of a layer buffer (the header comes with the first range)."""
        with self._cond:
            inc = self._incoming.get(request_id)
        if inc is None:
            raise KeyError(f"no transfer expected for request {request_id!r}")
        if inc.state is TransferState.FAILED:
            return  # already failed: drop the rest of this attempt
        if header is not None:
            self._start_layer(inc, header)
        if inc.state is TransferState.FAILED:
            return
        if layer not in inc.buffers:
            self._fail(inc, f"layer {layer}: bytes before the layer's header")
            return
        hdr, buf, got = inc.buffers[layer]
        flat = buf.view(-1).view(torch.uint8).numpy()
        src = data.numpy() if isinstance(data, torch.Tensor) else np.frombuffer(data, np.uint8)
        if offset + src.size > flat.size:
            self._fail(inc, f"layer {layer}: bytes past the end of the buffer")
            return
        flat[offset:offset + src.size] = src
        got += src.size
        inc.buffers[layer] = (hdr, buf, got)
        if got == flat.size:
            self._complete_layer(inc, layer)

    def _start_layer(self, inc: _Incoming, header: LayerHeader) -> None:
        n_blocks = header.shape[1] if len(header.shape) == 5 else -1
        if n_blocks != len(inc.block_ids) or header.dtype not in DTYPES:
            self._fail(inc, f"layer {header.layer}: shape {header.shape} does not fit "
                            f"{len(inc.block_ids)} reserved blocks")
            return
        inc.num_layers = header.num_layers
        inc.state = TransferState.TRANSFERRING
        buf = torch.empty(header.shape, dtype=DTYPES[header.dtype])
        inc.buffers[header.layer] = (header, buf, 0)

    def _complete_layer(self, inc: _Incoming, layer: int) -> None:
        header, buf, got = inc.buffers.pop(layer)
        inc.bytes += got
        if tuple(block_checksums(buf)) != header.block_crc32:
            inc.corrupt.add(layer)
        else:
            k_cache, v_cache = self.kv_layers[layer]
            scatter_kv_blocks(buf.to(k_cache.device), k_cache, v_cache,
                              torch.tensor(inc.block_ids, dtype=torch.int64))
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

"""What every sender backend shares: retained layers, their checksums, one
retry, and fault injection for tests.

Lifecycle of a ``RetryingSendHandle``: ``send_layer`` (on the engine thread)
only keeps the layer buffer and hands it to the backend's ``_transmit``; the
backend's transport thread calls ``OutgoingLayer.header`` just before the
layer's first byte leaves, which computes the block checksums there, once.
``finish`` asks the backend for the receiver's verdict and, if it failed,
re-sends every retained layer once as attempt 2 (same checksums).
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from dataclasses import dataclass

import torch

from kvtransfer.base import DTYPE_NAMES, LayerHeader, SendHandle, TransferResult
from kvtransfer.integrity import block_checksums


@dataclass
class FaultPlan:
    """Test hook: corrupt one block in each of the next ``corrupt_sends``
    layer buffers sent (the checksums are those of the intact buffer)."""

    corrupt_sends: int = 0

    def apply(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.corrupt_sends <= 0:
            return buffer
        self.corrupt_sends -= 1
        bad = buffer.clone()
        bad[0, 0].view(-1).view(torch.uint8)[:4] ^= 0xFF  # flip a word of block 0's keys
        return bad


class OutgoingLayer:
    """One layer handed over by the engine: the retained buffer and its block
    checksums, computed on first use by whichever transport thread needs them."""

    def __init__(self, request_id: str, layer: int, num_layers: int, buffer: torch.Tensor):
        self.request_id, self.layer, self.num_layers = request_id, layer, num_layers
        self.buffer = buffer  # (2, n, block_size, kv_heads, head_dim), contiguous
        self._crc32: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def header(self, attempt: int) -> LayerHeader:
        with self._lock:
            if self._crc32 is None:
                self._crc32 = tuple(block_checksums(self.buffer))
        return LayerHeader(self.request_id, attempt, self.layer, self.num_layers,
                           tuple(self.buffer.shape), DTYPE_NAMES[self.buffer.dtype], self._crc32)


class RetryingSendHandle(SendHandle):
    def __init__(self, request_id: str, num_layers: int, faults: FaultPlan | None = None):
        self.request_id = request_id
        self.num_layers = num_layers
        self.faults = faults or FaultPlan()
        self.attempt = 1
        self._layers: list[OutgoingLayer] = []
        self._t0: float | None = None
        self.bytes_sent = 0

    def send_layer(self, layer: int, buffer: torch.Tensor) -> None:
        self._t0 = self._t0 or time.perf_counter()
        out = OutgoingLayer(self.request_id, layer, self.num_layers,
                            self._stage(buffer.contiguous()))
        self._layers.append(out)
        self._send(out)

    def _send(self, out: OutgoingLayer) -> None:
        self.bytes_sent += out.nbytes
        self._transmit(out, self.attempt, self.faults.apply(out.buffer))

    def finish(self, timeout_s: float = 60.0) -> TransferResult:
        ok, error = self._verdict(timeout_s)
        if not ok and self._layers:
            self.attempt = 2
            self._restart()
            for out in self._layers:
                self._send(out)
            ok, error = self._verdict(timeout_s)
        seconds = time.perf_counter() - (self._t0 or time.perf_counter())
        self._layers.clear()
        return TransferResult(self.request_id, ok, self.attempt, self.bytes_sent, seconds, error)

    def _stage(self, buffer: torch.Tensor) -> torch.Tensor:
        """Where the backend wants the retained buffer (default: where it is)."""
        return buffer

    @abstractmethod
    def _transmit(self, out: OutgoingLayer, attempt: int, payload: torch.Tensor) -> None:
        """Start moving ``payload`` (``out.buffer``, or a corrupted copy of it)
        as layer ``out.layer`` of ``attempt``; non-blocking. Call
        ``out.header(attempt)`` on the transport thread, not here."""

    @abstractmethod
    def _verdict(self, timeout_s: float) -> tuple[bool, str]:
        """End the current attempt and wait for the receiver's (ok, error)."""

    @abstractmethod
    def _restart(self) -> None:
        """Prepare a second attempt after a failed verdict."""


def byte_view(buffer: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(buffer.view(-1).view(torch.uint8).numpy())

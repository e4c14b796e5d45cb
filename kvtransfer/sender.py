"""What every sender backend shares: headers, retained buffers, one retry,
and fault injection for tests.

Lifecycle of a ``RetryingSendHandle``: ``send_layer`` computes the layer's
checksums, keeps the buffer and hands it to the backend's ``_transmit``;
``finish`` asks the backend for the receiver's verdict and, if it failed,
re-sends every retained layer once as attempt 2.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass

import torch

from kvtransfer.base import DTYPE_NAMES, LayerHeader, SendHandle, TransferResult
from kvtransfer.integrity import block_checksums


@dataclass
class FaultPlan:
    """Test hook: corrupt one block in each of the next ``corrupt_sends``
    layer buffers sent (after their checksums were taken)."""

    corrupt_sends: int = 0

    def apply(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.corrupt_sends <= 0:
            return buffer
        self.corrupt_sends -= 1
        bad = buffer.clone()
        bad[0, 0].view(-1).view(torch.uint8)[:4] ^= 0xFF  # flip a word of block 0's keys
        return bad


class RetryingSendHandle(SendHandle):
    def __init__(self, request_id: str, num_layers: int, faults: FaultPlan | None = None):
        self.request_id = request_id
        self.num_layers = num_layers
        self.faults = faults or FaultPlan()
        self.attempt = 1
        self._layers: list[tuple[LayerHeader, torch.Tensor]] = []
        self._t0: float | None = None
        self.bytes_sent = 0

    def send_layer(self, layer: int, buffer: torch.Tensor) -> None:
        self._t0 = self._t0 or time.perf_counter()
        buffer = buffer.contiguous()
        header = LayerHeader(self.request_id, self.attempt, layer, self.num_layers,
                             tuple(buffer.shape), DTYPE_NAMES[buffer.dtype],
                             tuple(block_checksums(buffer)))
        self._layers.append((header, buffer))
        self._send(header, buffer)

    def _send(self, header: LayerHeader, buffer: torch.Tensor) -> None:
        self.bytes_sent += header.nbytes
        self._transmit(header, self.faults.apply(buffer))

    def finish(self, timeout_s: float = 60.0) -> TransferResult:
        ok, error = self._verdict(timeout_s)
        if not ok and self._layers:
            self.attempt = 2
            self._restart()
            for header, buffer in self._layers:
                self._send(LayerHeader(**{**header.__dict__, "attempt": 2}), buffer)
            ok, error = self._verdict(timeout_s)
        seconds = time.perf_counter() - (self._t0 or time.perf_counter())
        self._layers.clear()
        return TransferResult(self.request_id, ok, self.attempt, self.bytes_sent, seconds, error)

    @abstractmethod
    def _transmit(self, header: LayerHeader, buffer: torch.Tensor) -> None:
        """Start moving one layer (non-blocking)."""

    @abstractmethod
    def _verdict(self, timeout_s: float) -> tuple[bool, str]:
        """End the current attempt and wait for the receiver's (ok, error)."""

    @abstractmethod
    def _restart(self) -> None:
        """Prepare a second attempt after a failed verdict."""


def byte_view(buffer: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(buffer.view(-1).view(torch.uint8).numpy())

"""In-process transport: the sender writes straight into a receiver living in
the same process. For colocated pools and tests of the transfer protocol;
it runs the same verification as the network backends.

Lifecycle: a ``LocalKVReceiver`` registers itself under ``local://<n>``;
senders look it up by that endpoint.
"""

from __future__ import annotations

import itertools

import torch

from kvtransfer.base import KVReceiver, KVSender, ReceiverCore
from kvtransfer.sender import FaultPlan, OutgoingLayer, RetryingSendHandle

_RECEIVERS: dict[str, LocalKVReceiver] = {}
_IDS = itertools.count()


class LocalKVReceiver(KVReceiver):
    name = "local"

    def __init__(self, core: ReceiverCore):
        self.core = core
        self._endpoint = f"local://{next(_IDS)}"
        _RECEIVERS[self._endpoint] = self

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def close(self) -> None:
        _RECEIVERS.pop(self._endpoint, None)


class _LocalSendHandle(RetryingSendHandle):
    def __init__(self, receiver: LocalKVReceiver, request_id, num_layers, faults):
        super().__init__(request_id, num_layers, faults)
        self.receiver = receiver
        receiver.core.begin_attempt(request_id, 1)

    def _transmit(self, out: OutgoingLayer, attempt: int, payload: torch.Tensor) -> None:
        # No transport thread here: the caller's thread checksums and places.
        data = payload.view(-1).view(torch.uint8)
        self.receiver.core.on_bytes(out.header(attempt), self.request_id, out.layer, 0, data)

    def _verdict(self, timeout_s: float) -> tuple[bool, str]:
        ok, _, _, error = self.receiver.core.verdict(self.request_id)
        return ok, error

    def _restart(self) -> None:
        self.receiver.core.begin_attempt(self.request_id, 2)


class LocalKVSender(KVSender):
    name = "local"

    def __init__(self) -> None:
        self.faults = FaultPlan()

    def open(self, request_id: str, endpoint: str, num_layers: int) -> _LocalSendHandle:
        if endpoint not in _RECEIVERS:
            raise ValueError(f"no local KV receiver at {endpoint!r}")
        return _LocalSendHandle(_RECEIVERS[endpoint], request_id, num_layers, self.faults)

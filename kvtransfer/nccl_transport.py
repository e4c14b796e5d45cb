"""KV transfer over point-to-point send/recv of a torch.distributed group
formed per (prefill, decode) worker pair: NCCL on GPUs, gloo on CPU.

Lifecycle:
- each decode worker hosts a ``TCPStore`` and advertises ``host:port``; an
  acceptor thread waits for pair announcements in it;
- the first transfer from a prefill worker to that endpoint announces a new
  pair ``k`` in the store; both sides build a two-rank process group over the
  store's ``pair/k/`` prefix (prefill rank 0, decode rank 1) — no global
  process group, so one worker pairs with any number of peers;
- per pair, one sender thread (prefill side) and one receiver thread (decode
  side) move messages in order: ``meta`` (int64 [header bytes, data bytes]),
  a JSON header, then the layer's raw bytes; an ``end`` header closes an
  attempt and the receiver answers with a JSON verdict on tag 1. The sender
  thread computes each layer's checksums just before its header goes out.
Headers are JSON, never pickle.
"""

from __future__ import annotations

import datetime
import json
import queue
import threading
from concurrent.futures import Future

import torch
import torch.distributed as dist

from kvtransfer.base import KVReceiver, KVSender, LayerHeader, ReceiverCore
from kvtransfer.sender import FaultPlan, OutgoingLayer, RetryingSendHandle

_DATA_TAG, _ACK_TAG = 0, 1
_TIMEOUT = datetime.timedelta(seconds=120)


def _make_group(store, prefix: str, rank: int, device: torch.device):
    sub = dist.PrefixStore(prefix, store)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(sub, rank, 2, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(sub, rank, 2, _TIMEOUT)


class _Pair:
    """Framed messages over one two-rank group, used by one thread per side."""

    def __init__(self, group, rank: int, device: torch.device):
        self.group, self.peer, self.device = group, 1 - rank, device
        self._data = torch.empty(0, dtype=torch.uint8, device=device)  # reused for payloads

    def send_msg(self, header: dict, data: torch.Tensor | None = None, tag: int = _DATA_TAG):
        head = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        nbytes = 0 if data is None else data.numel()
        meta = torch.tensor([head.numel(), nbytes], dtype=torch.int64)
        for t in (meta, head) + ((data,) if data is not None else ()):
            self.group.send([t.to(self.device)], self.peer, tag).wait()

    def recv_msg(self, tag: int = _DATA_TAG) -> tuple[dict, torch.Tensor | None]:
        """The next message; its data stays valid until the next call."""
        meta = self._recv(torch.empty(2, dtype=torch.int64), tag)
        head = self._recv(torch.empty(int(meta[0]), dtype=torch.uint8), tag)
        header = json.loads(bytes(head.cpu().numpy()).decode())
        data = self._recv(self._payload(int(meta[1])), tag) if meta[1] else None
        return header, data

    def _payload(self, nbytes: int) -> torch.Tensor:
        """A receive buffer reused across messages: no fresh pages per layer."""
        if self._data.numel() < nbytes:
            self._data = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._data[:nbytes]

    def _recv(self, t: torch.Tensor, tag: int) -> torch.Tensor:
        t = t.to(self.device)
        self.group.recv([t], self.peer, tag).wait()
        return t


class NcclKVReceiver(KVReceiver):
    name = "nccl"

    def __init__(self, core: ReceiverCore, host: str = "127.0.0.1",
                 device: str | torch.device = "cpu"):
        self.core, self.device = core, torch.device(device)
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self._host = host
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="kv-nccl-accept").start()

    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self._store.port}"

    def _accept(self) -> None:
        k = 1
        while True:
            try:
                self._store.wait([f"pair/{k}/ready"], datetime.timedelta(days=365))
            except (RuntimeError, dist.DistStoreError):
                return  # store shut down
            if self._closed:
                return
            group = _make_group(self._store, f"pair/{k}/", 1, self.device)
            pair = _Pair(group, 1, self.device)
            threading.Thread(target=self._serve, args=(pair,), daemon=True,
                             name=f"kv-nccl-recv-{k}").start()
            k += 1

    def _serve(self, pair: _Pair) -> None:
        while not self._closed:
            try:
                header, data = pair.recv_msg()
            except RuntimeError:
                return  # peer gone; its transfers time out on the decode side
            rid = header["request_id"]
            if header["kind"] == "end":
                ok, _, _, error = self.core.verdict(rid)
                if not ok:
                    self.core.fail(rid, error)
                pair.send_msg({"request_id": rid, "ok": ok, "error": error}, tag=_ACK_TAG)
                continue
            try:
                self._on_layer(header, data)
            except (KeyError, ValueError) as exc:
                self.core.fail(rid, f"bad layer message: {exc}")

    def _on_layer(self, header: dict, data: torch.Tensor) -> None:
        rid = header["request_id"]
        if not self.core.begin_attempt(rid, header["attempt"]):
            return  # cancelled meanwhile: drop the bytes
        hdr = LayerHeader(rid, header["attempt"], header["layer"], header["num_layers"],
                          tuple(header["shape"]), header["dtype"], tuple(header["crc"]))
        self.core.on_bytes(hdr, rid, hdr.layer, 0, data.cpu())

    def close(self) -> None:
        self._closed = True
        # A second connection: the acceptor thread holds the first one in wait().
        client = dist.TCPStore(self._host, self._store.port, is_master=False, timeout=_TIMEOUT)
        k = client.add("pairs", 0) + 1
        client.set(f"pair/{k}/ready", "closed")  # wakes the acceptor


class _PairSender:
    """The prefill side of one pair: a thread sending queued messages in order."""

    def __init__(self, endpoint: str, device: torch.device):
        host, port = endpoint.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=_TIMEOUT)
        k = store.add("pairs", 1)
        store.set(f"pair/{k}/ready", "1")
        self.pair = _Pair(_make_group(store, f"pair/{k}/", 0, device), 0, device)
        self._store = store  # keeps the connection alive
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name=f"kv-nccl-send-{k}").start()

    def _run(self) -> None:
        while True:
            header, data, done = self.queue.get()
            try:
                self.pair.send_msg(header() if callable(header) else header, data)
                if done is not None:
                    ack, _ = self.pair.recv_msg(tag=_ACK_TAG)
                    done.set_result((ack["ok"], ack["error"]))
            except RuntimeError as exc:  # peer gone: fail this and later attempts
                if done is not None:
                    done.set_result((False, f"nccl: {exc}"))


class _NcclSendHandle(RetryingSendHandle):
    def __init__(self, sender: _PairSender, request_id, num_layers, faults):
        super().__init__(request_id, num_layers, faults)
        self.sender = sender

    def _transmit(self, out: OutgoingLayer, attempt: int, payload: torch.Tensor) -> None:
        self.sender.queue.put((lambda: _layer_meta(out.header(attempt)),
                               payload.view(-1).view(torch.uint8), None))

    def _verdict(self, timeout_s: float) -> tuple[bool, str]:
        done: Future = Future()
        self.sender.queue.put(({"kind": "end", "request_id": self.request_id}, None, done))
        try:
            return done.result(timeout=timeout_s)
        except TimeoutError:
            return False, f"nccl: no verdict within {timeout_s} s"

    def _restart(self) -> None:
        pass  # the receiver resets on the attempt number of the next layer


def _layer_meta(header: LayerHeader) -> dict:
    return {"kind": "layer", "request_id": header.request_id, "attempt": header.attempt,
            "layer": header.layer, "num_layers": header.num_layers,
            "shape": list(header.shape), "dtype": header.dtype,
            "crc": list(header.block_crc32)}


class NcclKVSender(KVSender):
    name = "nccl"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.faults = FaultPlan()
        self._pairs: dict[str, _PairSender] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str, endpoint: str, num_layers: int) -> _NcclSendHandle:
        with self._lock:
            if endpoint not in self._pairs:
                self._pairs[endpoint] = _PairSender(endpoint, self.device)
        return _NcclSendHandle(self._pairs[endpoint], request_id, num_layers, self.faults)

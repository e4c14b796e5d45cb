"""Moving KV blocks between workers: transports by name.

``make_sender(name)`` / ``make_receiver(name, core)`` build a backend:
``grpc`` (everywhere), ``nccl`` (NCCL on GPUs, gloo on CPU), ``local``
(same process; tests and colocated pools).
"""

from __future__ import annotations

from kvtransfer.base import KVReceiver, KVSender, ReceiverCore, TransferState

TRANSPORTS = ("grpc", "nccl", "local")


def make_sender(name: str, device: str = "cpu") -> KVSender:
    if name == "grpc":
        from kvtransfer.grpc_transport import GrpcKVSender
        return GrpcKVSender()
    if name == "nccl":
        from kvtransfer.nccl_transport import NcclKVSender
        return NcclKVSender(device)
    if name == "local":
        from kvtransfer.local_transport import LocalKVSender
        return LocalKVSender()
    raise ValueError(f"transport {name!r} is unknown; known: {', '.join(TRANSPORTS)}")


def make_receiver(name: str, core: ReceiverCore, host: str = "127.0.0.1",
                  device: str = "cpu") -> KVReceiver:
    if name == "grpc":
        from kvtransfer.grpc_transport import GrpcKVReceiver
        return GrpcKVReceiver(core, host)
    if name == "nccl":
        from kvtransfer.nccl_transport import NcclKVReceiver
        return NcclKVReceiver(core, host, device)
    if name == "local":
        from kvtransfer.local_transport import LocalKVReceiver
        return LocalKVReceiver(core)
    raise ValueError(f"transport {name!r} is unknown; known: {', '.join(TRANSPORTS)}")


__all__ = ["KVReceiver", "KVSender", "ReceiverCore", "TRANSPORTS", "TransferState",
           "make_receiver", "make_sender"]

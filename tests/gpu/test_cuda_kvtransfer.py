"""KV transfer between caches in GPU memory over the gRPC transport (the
bytes cross loopback through host memory): blocks land bit-exact in the
receiver's own block ids, and a corrupt send is caught and retried. NCCL
needs one GPU per rank, so it is not exercised on a one-GPU machine."""

from __future__ import annotations

import pytest
import torch
from test_transports import BLOCKS, BS, HEADS, LAYERS, landed, send  # tests/kvtransfer

from kvtransfer import make_receiver, make_sender
from kvtransfer.base import ReceiverCore, TransferState

DIM = 64  # head size of these GPU caches (the CPU tests use 8)


def caches(fill: bool, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    make = (lambda: torch.randn(BLOCKS, BS, HEADS, DIM, generator=gen)) if fill else \
        (lambda: torch.zeros(BLOCKS, BS, HEADS, DIM))
    return [(make().to(dtype).cuda(), make().to(dtype).cuda()) for _ in range(LAYERS)]


@pytest.fixture
def pair():
    dst = caches(False)
    receiver = make_receiver("grpc", ReceiverCore(dst))
    sender = make_sender("grpc", "cuda")
    yield sender, receiver, dst
    receiver.close()
    sender.close()


@pytest.mark.parametrize("corrupt", [0, 1])
def test_gpu_blocks_land_bit_exact_over_grpc(pair, corrupt):
    sender, receiver, dst = pair
    src = caches(True)
    sender.faults.corrupt_sends = corrupt
    result = send(sender, receiver, src, f"r{corrupt}")
    assert (result.ok, result.attempts) == (True, 1 + corrupt)
    assert receiver.take(f"r{corrupt}").state is TransferState.SUCCESS
    assert landed(src, dst)

"""KV transfer between caches in GPU memory over the gRPC transport (the
bytes cross loopback through host memory): blocks land bit-exact in the
receiver's own block ids, and a corrupt send is caught and retried. NCCL
needs one GPU per rank, so it is not exercised on a one-GPU machine."""

from __future__ import annotations

import pytest
import torch

from kernels import gather_kv_blocks
from kvtransfer import make_receiver, make_sender
from kvtransfer.base import ReceiverCore, TransferState

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 32, 16, 2, 64
SRC_IDS, DST_IDS = [3, 7, 1, 9, 30], [10, 11, 20, 2, 5]


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


def send(sender, receiver, src, rid):
    receiver.expect(rid, DST_IDS)
    handle = sender.open(rid, receiver.endpoint, LAYERS)
    ids = torch.tensor(SRC_IDS, device="cuda")
    for layer in range(LAYERS):
        handle.send_layer(layer, gather_kv_blocks(*src[layer], ids))
    return handle.finish(timeout_s=30)


@pytest.mark.parametrize("corrupt", [0, 1])
def test_gpu_blocks_land_bit_exact_over_grpc(pair, corrupt):
    sender, receiver, dst = pair
    src = caches(True)
    sender.faults.corrupt_sends = corrupt
    result = send(sender, receiver, src, f"r{corrupt}")
    assert (result.ok, result.attempts) == (True, 1 + corrupt)
    assert receiver.take(f"r{corrupt}").state is TransferState.SUCCESS
    for layer in range(LAYERS):
        for i in (0, 1):
            assert torch.equal(dst[layer][i][DST_IDS], src[layer][i][SRC_IDS])

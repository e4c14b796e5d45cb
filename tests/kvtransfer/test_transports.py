"""Every transport moves exactly the bytes of the named blocks into the
receiver's own block ids, detects corruption, retries once, and fails
cleanly on a stream that cannot fit the reservation."""

from __future__ import annotations

import pytest
import torch

from kernels import gather_kv_blocks
from kvtransfer import make_receiver, make_sender
from kvtransfer.base import LayerHeader, ReceiverCore, TransferState
from kvtransfer.integrity import block_checksums

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 32, 16, 2, 8
SRC_IDS, DST_IDS = [3, 7, 1, 9, 30], [10, 11, 20, 2, 5]


def caches(fill: bool):
    gen = torch.Generator().manual_seed(0)
    make = (lambda: torch.randn(BLOCKS, BS, HEADS, DIM, generator=gen)) if fill else \
        (lambda: torch.zeros(BLOCKS, BS, HEADS, DIM))
    return [(make(), make()) for _ in range(LAYERS)]


@pytest.fixture(params=["local", "grpc", "nccl"])
def pair(request):
    dst = caches(False)
    receiver = make_receiver(request.param, ReceiverCore(dst))
    sender = make_sender(request.param)
    yield sender, receiver, dst
    receiver.close()
    sender.close()


def send(sender, receiver, src, rid):
    receiver.expect(rid, DST_IDS)
    handle = sender.open(rid, receiver.endpoint, LAYERS)
    ids = torch.tensor(SRC_IDS, device=src[0][0].device)  # the caches' device (tests/gpu too)
    for layer in range(LAYERS):
        handle.send_layer(layer, gather_kv_blocks(*src[layer], ids))
    return handle.finish(timeout_s=30)


def landed(src, dst) -> bool:
    return all(torch.equal(dst[layer][i][DST_IDS], src[layer][i][SRC_IDS])
               for layer in range(LAYERS) for i in (0, 1))


def test_blocks_land_bit_exact_in_the_receivers_ids(pair):
    sender, receiver, dst = pair
    src = caches(True)
    result = send(sender, receiver, src, "a")
    assert (result.ok, result.attempts) == (True, 1)
    assert result.bytes_sent == LAYERS * 2 * len(SRC_IDS) * BS * HEADS * DIM * 4
    got = receiver.take("a")
    assert got.state is TransferState.SUCCESS and len(got.layer_arrival_s) == LAYERS
    assert landed(src, dst)
    untouched = [b for b in range(BLOCKS) if b not in DST_IDS]
    assert all(dst[layer][0][untouched].abs().sum() == 0 for layer in range(LAYERS))


def test_one_corrupt_send_is_retried(pair):
    sender, receiver, dst = pair
    src = caches(True)
    sender.faults.corrupt_sends = 1
    result = send(sender, receiver, src, "b")
    assert (result.ok, result.attempts) == (True, 2)
    assert receiver.take("b").state is TransferState.SUCCESS and landed(src, dst)


def test_persistent_corruption_fails_and_names_the_layer(pair):
    sender, receiver, _ = pair
    sender.faults.corrupt_sends = 2 * LAYERS
    result = send(sender, receiver, caches(True), "c")
    assert (result.ok, result.attempts) == (False, 2)
    assert "checksum mismatch in layers [0, 1, 2]" in result.error
    got = receiver.take("c")
    assert got.state is TransferState.FAILED and got.corrupt_layers == (0, 1, 2)


def test_core_rejects_a_layer_that_does_not_fit_the_reservation():
    core = ReceiverCore(caches(False))
    core.expect("d", DST_IDS)
    core.begin_attempt("d", 1)
    buf = torch.zeros(2, 3, BS, HEADS, DIM)  # 3 blocks for 5 reserved
    header = LayerHeader("d", 1, 0, LAYERS, tuple(buf.shape), "float32",
                         tuple(block_checksums(buf)))
    core.on_bytes(header, "d", 0, 0, buf.view(-1).view(torch.uint8))
    assert core.state("d") is TransferState.FAILED
    assert "does not fit 5 reserved blocks" in core.take("d").error


def test_bytes_for_an_unexpected_request_are_refused():
    core = ReceiverCore(caches(False))
    with pytest.raises(KeyError, match="no transfer expected for request 'zzz'"):
        core.on_bytes(None, "zzz", 0, 0, b"\x00" * 4)


def test_checksums_change_with_any_word():
    buf = torch.randn(2, 4, BS, HEADS, DIM)
    base = block_checksums(buf)
    bad = buf.clone()
    bad[1, 2, 5, 1, 3] += 1.0  # a value in block 2
    changed = block_checksums(bad)
    assert [a == b for a, b in zip(base, changed)] == [True, True, False, True]

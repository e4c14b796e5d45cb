"""The pieces under the transports: the gRPC wire codec (no copy of the
data), placement straight into the reserved blocks, checksums read in place,
and where the sender computes its checksums."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest
import torch

from kernels import gather_kv_blocks
from kvtransfer import grpc_transport as gt
from kvtransfer import integrity, make_receiver, make_sender, sender
from kvtransfer.base import LayerHeader, ReceiverCore, TransferState
from kvtransfer.integrity import block_checksums, byte_rows, cache_block_checksums
from kvtransfer.placement import DirectSink, StagedSink, make_sink
from proto.baton.v1 import kv_transfer_pb2 as pb

BLOCKS, BS, HEADS, DIM = 32, 16, 2, 8
BLOCK_BYTES = BS * HEADS * DIM * 4  # 1024
IDS = [10, 11, 20, 2, 5]


def layer_buffer(n: int = len(IDS), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, BS, HEADS, DIM, generator=gen)  # (2, n, BS, HEADS, DIM)


def header_for(buf: torch.Tensor, layer: int = 0) -> LayerHeader:
    return LayerHeader("r", 1, layer, 3, tuple(buf.shape), "float32",
                       tuple(block_checksums(buf)))


# ----- checksums ----------------------------------------------------------------------
def test_block_checksums_are_zlib_crc32_of_keys_then_values():
    buf = layer_buffer()
    raw = buf.numpy()
    want = [zlib.crc32(raw[1, b].tobytes(), zlib.crc32(raw[0, b].tobytes()))
            for b in range(len(IDS))]
    assert block_checksums(buf) == want


def test_checksums_read_in_place_equal_those_of_the_gathered_buffer():
    k, v = torch.randn(BLOCKS, BS, HEADS, DIM), torch.randn(BLOCKS, BS, HEADS, DIM)
    gathered = gather_kv_blocks(k, v, torch.tensor(IDS))
    assert cache_block_checksums(byte_rows(k), byte_rows(v), IDS) == block_checksums(gathered)


def test_isal_and_zlib_agree_on_every_value():
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)
    assert isal_zlib.crc32(data) == zlib.crc32(data)
    assert isal_zlib.crc32(data[7:], 12345) == zlib.crc32(data[7:], 12345)


# ----- gRPC wire codec -----------------------------------------------------------------
def test_chunks_round_trip_on_block_boundaries_with_the_header_on_the_first():
    buf = layer_buffer()
    header = header_for(buf)
    raw = sender.byte_view(buf)
    wires = list(gt.encode_chunks(header, raw, 3000))  # 3000 -> 2 blocks (2048 B) a chunk
    decoded = [gt.decode_chunk(w) for w in wires]
    assert [f.offset for f, _ in decoded] == [0, 2048, 4096, 6144, 8192]
    assert b"".join(bytes(d) for _, d in decoded) == bytes(raw)
    first = decoded[0][0]
    assert gt._header(first) == header
    assert [len(f.block_crc32) for f, _ in decoded] == [5, 0, 0, 0, 0]


def test_decode_keeps_data_as_a_view_of_the_message():
    wire = next(gt.encode_chunks(header_for(layer_buffer()), sender.byte_view(layer_buffer()),
                                 1 << 20))
    _, data = gt.decode_chunk(wire)
    assert data.obj is wire  # no copy


def test_decode_reads_a_message_protobuf_encoded_in_any_field_order():
    msg = pb.KVChunk(request_id="x", attempt=2, layer=1, offset=4096, layer_bytes=8192,
                     data=b"\x01\x02\x03", block_crc32=[1, 2**32 - 1], dtype="float16",
                     shape=[2, 1, 16, 2, 8], num_layers=4)
    fields, data = gt.decode_chunk(msg.SerializeToString())
    assert bytes(data) == b"\x01\x02\x03"
    assert (fields.request_id, fields.attempt, fields.layer, fields.offset, fields.layer_bytes,
            list(fields.block_crc32), fields.dtype, list(fields.shape), fields.num_layers) == \
        ("x", 2, 1, 4096, 8192, [1, 2**32 - 1], "float16", [2, 1, 16, 2, 8], 4)
    assert fields.data == b""


def test_decode_refuses_a_truncated_message():
    wire = pb.KVChunk(request_id="x", data=b"abcdef").SerializeToString()
    with pytest.raises(ValueError, match="truncated"):
        gt.decode_chunk(wire[:-2])


def test_the_sender_refuses_a_chunk_size_out_of_range():
    with pytest.raises(ValueError, match=r"chunk_bytes must be in \[1, 33554432\], got 0"):
        gt.GrpcKVSender(chunk_bytes=0)


# ----- placement -----------------------------------------------------------------------
def empty_cache():
    return torch.zeros(BLOCKS, BS, HEADS, DIM), torch.zeros(BLOCKS, BS, HEADS, DIM)


def pieces_of(buf: torch.Tensor, order: str, size: int = 700):
    """Byte ranges of ``size`` (across block boundaries), in stream order or shuffled."""
    raw = buf.view(-1).view(torch.uint8).numpy()
    pieces = [(off, raw[off:off + size]) for off in range(0, raw.size, size)]
    if order == "shuffled":
        pieces = [pieces[i] for i in np.random.default_rng(1).permutation(len(pieces))]
    return pieces


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_ranges_in_any_order_and_size_land_in_the_reserved_blocks(order):
    k, v = empty_cache()
    buf = layer_buffer()
    sink = make_sink(k, v, IDS, tuple(buf.shape), torch.float32)
    assert isinstance(sink, DirectSink)
    for offset, src in pieces_of(buf, order):
        sink.write(offset, src)
    assert torch.equal(k[IDS], buf[0]) and torch.equal(v[IDS], buf[1])
    others = [b for b in range(BLOCKS) if b not in IDS]
    assert k[others].abs().sum() == 0 and v[others].abs().sum() == 0
    assert sink.finish(tuple(block_checksums(buf)))


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_a_corrupt_block_fails_the_check(order):
    k, v = empty_cache()
    buf = layer_buffer()
    sink = DirectSink(k, v, IDS)
    bad = buf.clone()
    bad[1, 3, 0, 0, 0] += 1.0  # one value of block 3's values
    for offset, src in pieces_of(bad, order):
        sink.write(offset, src)
    assert not sink.finish(tuple(block_checksums(buf)))


def test_a_cache_that_is_not_contiguous_is_staged_and_scattered_only_when_verified():
    store = torch.zeros(BS, BLOCKS, HEADS, DIM), torch.zeros(BS, BLOCKS, HEADS, DIM)
    k, v = (t.transpose(0, 1) for t in store)  # (BLOCKS, BS, HEADS, DIM), not contiguous
    buf = layer_buffer()
    good = make_sink(k, v, IDS, tuple(buf.shape), torch.float32)
    assert isinstance(good, StagedSink)
    crcs = tuple(block_checksums(buf))
    bad = make_sink(k, v, IDS, tuple(buf.shape), torch.float32)
    flipped = buf.clone()
    flipped[0, 2, 1, 1, 1] += 1.0
    bad.write(0, flipped.view(-1).view(torch.uint8).numpy())
    assert not bad.finish(crcs) and k.abs().sum() == 0
    good.write(0, buf.view(-1).view(torch.uint8).numpy())
    assert good.finish(crcs)
    assert torch.equal(k[IDS], buf[0]) and torch.equal(v[IDS], buf[1])


# ----- ReceiverCore ---------------------------------------------------------------------
def core_with_cache():
    caches = [empty_cache() for _ in range(3)]
    return ReceiverCore(caches), caches


def test_a_layer_of_another_block_shape_or_dtype_is_refused():
    core, _ = core_with_cache()
    core.expect("d", IDS)
    core.begin_attempt("d", 1)
    buf = layer_buffer().half()
    header = LayerHeader("d", 1, 0, 3, tuple(buf.shape), "float16", tuple(block_checksums(buf)))
    core.on_bytes(header, "d", 0, 0, buf.view(-1).view(torch.uint8))
    got = core.take("d")
    assert got.state is TransferState.FAILED
    assert got.error == ("layer 0: blocks (16, 2, 8) float16 do not fit the cache's "
                         "(16, 2, 8) float32")


def test_take_waits_for_a_write_in_progress_and_stops_later_ones(monkeypatch):
    core, caches = core_with_cache()
    core.expect("e", IDS)
    core.begin_attempt("e", 1)
    buf = layer_buffer()
    raw = buf.view(-1).view(torch.uint8).numpy()
    writing, write = threading.Event(), DirectSink.write
    ends: dict[str, float] = {}

    def slow_write(self, offset, src):
        writing.set()
        time.sleep(0.2)
        write(self, offset, src)
        ends["write"] = time.monotonic()
    monkeypatch.setattr(DirectSink, "write", slow_write)
    writer = threading.Thread(target=core.on_bytes,
                              args=(header_for(buf), "e", 0, 0, raw[:4096]))
    writer.start()
    writing.wait(5)
    inc = core._incoming["e"]
    assert core.take("e").state is TransferState.TRANSFERRING
    ends["take"] = time.monotonic()
    writer.join()
    assert ends["take"] >= ends["write"] and inc.closed
    with pytest.raises(KeyError):
        core.on_bytes(None, "e", 0, 4096, raw[4096:])
    k, _ = caches[0]
    assert k[IDS[4]].abs().sum() == 0  # nothing past the first range was written


# ----- sender threads -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["grpc", "nccl"])
def test_checksums_are_computed_off_the_calling_thread(name, monkeypatch):
    threads: list[str] = []

    def recording(buffer):
        threads.append(threading.current_thread().name)
        return integrity.block_checksums(buffer)
    monkeypatch.setattr(sender, "block_checksums", recording)
    core, caches = core_with_cache()
    receiver, snd = make_receiver(name, core), make_sender(name)
    try:
        receiver.expect("t", IDS)
        handle = snd.open("t", receiver.endpoint, 3)
        for layer in range(3):
            handle.send_layer(layer, layer_buffer(seed=layer))
        result = handle.finish(timeout_s=30)
    finally:
        receiver.close()
        snd.close()
    assert result.ok and len(threads) == 3
    assert threading.current_thread().name not in threads
    assert all(torch.equal(caches[layer][0][IDS], layer_buffer(seed=layer)[0])
               for layer in range(3))


def test_grpc_chunks_smaller_than_a_block_still_land_bit_exact():
    core, caches = core_with_cache()
    receiver, snd = make_receiver("grpc", core), gt.GrpcKVSender(chunk_bytes=1000)
    try:
        receiver.expect("u", IDS)
        handle = snd.open("u", receiver.endpoint, 3)
        for layer in range(3):
            handle.send_layer(layer, layer_buffer(seed=layer))
        assert handle.finish(timeout_s=30).ok
    finally:
        receiver.close()
        snd.close()
    assert all(torch.equal(caches[layer][i][IDS], layer_buffer(seed=layer)[i])
               for layer in range(3) for i in (0, 1))

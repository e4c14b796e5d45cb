"""Gather/scatter of KV blocks: bit-exact round trips into other block ids."""

import pytest
import torch

from kernels import (
    gather_kv_blocks,
    gather_kv_blocks_ref,
    scatter_kv_blocks,
    scatter_kv_blocks_ref,
)

IMPLS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cache(num_blocks: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, 16, 2, 16, generator=gen).to(dtype)  # (NB, T, KVH, D)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_into_other_blocks_of_another_cache(impl, dtype, ids_dtype):
    src_k, src_v = _cache(10, dtype, 20), _cache(10, dtype, 21)
    source_ids = torch.tensor([5, 2, 9], dtype=ids_dtype)
    buffer = gather_kv_blocks(src_k, src_v, source_ids, impl=impl)
    assert buffer.shape == (2, 3, 16, 2, 16) and buffer.dtype == dtype
    assert buffer.is_contiguous()
    assert torch.equal(buffer[0], src_k[[5, 2, 9]]) and torch.equal(buffer[1], src_v[[5, 2, 9]])

    dst_k, dst_v = _cache(12, dtype, 22), _cache(12, dtype, 23)
    before_k, before_v = dst_k.clone(), dst_v.clone()
    target_ids = torch.tensor([0, 11, 4], dtype=ids_dtype)
    assert scatter_kv_blocks(buffer, dst_k, dst_v, target_ids, impl=impl) is None
    assert torch.equal(dst_k[[0, 11, 4]], src_k[[5, 2, 9]])
    assert torch.equal(dst_v[[0, 11, 4]], src_v[[5, 2, 9]])
    untouched = [i for i in range(12) if i not in (0, 11, 4)]
    assert torch.equal(dst_k[untouched], before_k[untouched])
    assert torch.equal(dst_v[untouched], before_v[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gather_equals_reference(dtype):
    k, v = _cache(10, dtype, 24), _cache(10, dtype, 25)
    ids = torch.tensor([3, 3, 0, 7])
    assert torch.equal(gather_kv_blocks(k, v, ids, impl="triton"), gather_kv_blocks_ref(k, v, ids))


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_layer_views_of_a_physical_cache(impl):
    physical = torch.randn(6, 2, 16, 2, 16)  # (NB, k|v, T, KVH, D): blocks interleave k and v
    k, v = physical[:, 0], physical[:, 1]  # (NB, T, KVH, D) each, non-contiguous
    assert not k.is_contiguous()
    buffer = gather_kv_blocks(k, v, torch.tensor([4, 1]), impl=impl)
    assert torch.equal(buffer, torch.stack([physical[[4, 1], 0], physical[[4, 1], 1]]))
    target = torch.zeros(3, 16, 16, 2).transpose(2, 3)  # (NB, T, KVH, D), heads innermost
    target_v = torch.zeros(3, 16, 2, 16)
    scatter_kv_blocks(buffer, target, target_v, torch.tensor([2, 0]), impl=impl)
    assert torch.equal(target[[2, 0]], k[[4, 1]]) and torch.equal(target_v[[2, 0]], v[[4, 1]])
    assert torch.equal(target[1], torch.zeros(16, 2, 16))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_blocks_gives_an_empty_buffer(impl):
    k, v = _cache(4, torch.float32, 26), _cache(4, torch.float32, 27)
    buffer = gather_kv_blocks(k, v, torch.tensor([], dtype=torch.int64), impl=impl)
    assert buffer.shape == (2, 0, 16, 2, 16)
    scatter_kv_blocks(buffer, k, v, torch.tensor([], dtype=torch.int64), impl=impl)


def _gather_args():
    return _cache(4, torch.float32, 28), _cache(4, torch.float32, 29), torch.tensor([1, 2])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda k, v, ids: (k[0], v, ids), r"k_cache must have shape \(num_blocks, block_size"),
        (lambda k, v, ids: (k, v[..., :8], ids), r"v_cache must have k_cache's shape"),
        (lambda k, v, ids: (k, v.half(), ids), r"v_cache must match k_cache's dtype"),
        (lambda k, v, ids: (k, v, ids[None]), r"block_ids must have shape \(n,\)"),
        (lambda k, v, ids: (k, v, ids.float()), r"block_ids must be int32 or int64"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_gather_arguments_raise_value_error(mutate, match, impl):
    with pytest.raises(ValueError, match=match):
        gather_kv_blocks(*mutate(*_gather_args()), impl=impl)


@pytest.mark.parametrize(
    ("buffer", "match"),
    [
        (torch.zeros(2, 3, 16, 2, 16), r"buffer must have shape .* = \(2, 2, 16, 2, 16\)"),
        (torch.zeros(2, 2, 16, 2, 8), r"buffer must have shape"),
        (torch.zeros(2, 2, 16, 2, 16).half(), r"buffer must match k_cache's dtype"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_scatter_buffer_raises_value_error(buffer, match, impl):
    k, v, ids = _gather_args()
    with pytest.raises(ValueError, match=match):
        scatter_kv_blocks(buffer, k, v, ids, impl=impl)
    with pytest.raises(ValueError, match=match):
        scatter_kv_blocks_ref(buffer, k, v, ids)

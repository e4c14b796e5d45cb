"""The model's and runner's hand-tuned torch ops equal the plain ones they replace."""

import pytest
import torch
import torch.nn.functional as F

from workers.kv_cache import KVCache, int_tensor
from workers.model import RMSNorm, apply_rope_
from workers.model_config import tiny_config


@pytest.mark.parametrize("shape", [(1, 256), (32, 256), (300, 256), (5, 10, 32)])
def test_rms_norm_is_bit_identical_to_functional(shape):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = 3 * torch.randn(shape, generator=gen)
    with torch.inference_mode():
        assert torch.equal(norm(x), F.rms_norm(x, (shape[-1],), norm.weight, 1e-5))


def test_rope_in_place_equals_the_out_of_place_formula():
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(7, 12, 32, generator=gen)  # (T, H + 2 KVH, D); q and k are a view
    cos, sin = torch.randn(7, 1, 32, generator=gen), torch.randn(7, 1, 32, generator=gen)
    x = qkv[:, :10].clone()
    x1, x2 = x.chunk(2, dim=-1)
    expected = x * cos + torch.cat([x2, x1], dim=-1) * sin
    v = qkv[:, 10:].clone()
    apply_rope_(qkv[:, :10], (cos, sin))
    assert torch.equal(qkv[:, :10], expected) and torch.equal(qkv[:, 10:], v)


def test_slot_view_writes_keys_and_values_where_the_layers_read_them():
    cache = KVCache(tiny_config(), num_blocks=4, block_size=16, dtype=torch.float32)
    kv = torch.randn(3, 2, 2, 32)  # (T, k/v, KVH, D)
    slots = torch.tensor([0, 17, 63])
    layer = cache.layer_caches[2]
    layer.slots.index_put_((slots,), kv)
    for t, s in enumerate(slots.tolist()):
        assert torch.equal(layer.k[s // 16, s % 16], kv[t, 0])
        assert torch.equal(layer.v[s // 16, s % 16], kv[t, 1])
        assert torch.equal(cache.layers[2][0][s // 16, s % 16], kv[t, 0])
    assert torch.count_nonzero(cache.data[:2]) == 0  # other layers untouched


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_int_tensor_equals_torch_tensor(dtype):
    values = [0, 5, -3, 2**31 - 1 if dtype == torch.int32 else 2**40]
    assert torch.equal(int_tensor(values, dtype), torch.tensor(values, dtype=dtype))
    assert int_tensor([], dtype).shape == (0,) and int_tensor([], dtype).dtype == dtype


@pytest.mark.parametrize("n, ctx", [(1, 1), (5, 40), (64, 64), (17, 300)])
def test_lower_right_causal_equals_the_explicit_mask(n, ctx):
    # the GPU's path for a prefill chunk after cached KV: lower-right causal bias, K/V heads
    # repeated; here against the boolean mask the CPU path builds
    from workers.model import Attention

    attn = Attention(tiny_config())
    gen = torch.Generator().manual_seed(n + ctx)
    q = torch.randn(n, attn.n_heads, attn.head_dim, generator=gen)
    k, v = (torch.randn(ctx, attn.n_kv, attn.head_dim, generator=gen) for _ in range(2))
    mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]  # (n, ctx)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=attn.scale, enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(attn._lower_right_causal(q, k, v), ref, atol=1e-6, rtol=1e-6)

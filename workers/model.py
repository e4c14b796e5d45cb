"""Llama-family decoder in torch: Llama 2/3, Mistral, Qwen2/2.5, Qwen3.

Lifecycle: built empty from a ``ModelConfig``, filled by ``loader`` (real
checkpoint) or ``init_dummy_weights`` (the tiny model), then run by the model
runner. Two forward paths share every weight:

- ``forward(input_ids, positions, meta, kv_caches)``: flattened tokens of many
  sequences; K/V written into the paged cache at ``meta.slot_mapping``; decode
  rows attend through the contiguous ``DecodeKVBuffer`` when the runner placed
  them there (``meta.decode_step``, CPU) or else the paged-decode-attention
  kernel (Triton on CUDA; on CPU the C++ one with ``meta.cpu_kernels``, or
  a gather + SDPA); prefill chunks attend to the KV already cached plus
  themselves (chunked prefill, prefix reuse, verification). With
  ``meta.cpu_kernels`` RMSNorm is a C++ op too;
- ``forward_dense(input_ids)``: one sequence, full causal attention, no cache:
  the naive reference the paged path is tested against.

Per forward, the RoPE tables of the step's positions are looked up once and
shared by every layer. q and k are rotated in place in the qkv projection's
output, so each layer writes a token's K and V to the cache in one op.
Weights are stored fused (``qkv``, ``gate_up``) as vLLM does: fewer, larger
matmuls. The loader splits Hugging Face tensors into them.
On CPU, large float32 inference matmuls run through oneDNN on a prepacked
copy of the weight (``Linear``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from kernels import cpu_kernels, decode_attention, paged_decode_attention_out
from workers.kv_cache import DecodeGroup, DecodeStep, LayerCache
from workers.model_config import ModelConfig, RopeScaling

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, signed sin), each (T, 1, D)


@dataclass
class PrefillSegment:
    """A run of query tokens of one sequence computed in this step."""

    start: int  # first row in the flattened batch
    num_tokens: int  # query rows
    context_len: int  # tokens of KV after this step (cached + these)
    block_table: torch.Tensor  # (num_blocks,) int64 physical block ids


@dataclass(frozen=True)
class PaddedPrefill:
    """The prefill segments with nothing cached before them ("fresh"), laid out
    for ONE causal attention call over a right-padded (S, Lmax) batch instead
    of one call per segment (GPU: launches, not FLOPs, bound small prompts).
    Padding rows sit after each segment's last token, so a causal mask keeps
    every real query away from them."""

    rows: torch.Tensor  # (N,) int64: the fresh segments' rows in the flattened batch
    slots: torch.Tensor  # (N,) int64: seg_index * max_len + position in the segment
    gather: torch.Tensor  # (S * max_len,) int64: the batch row each padded slot copies
    num_seqs: int  # S
    max_len: int  # Lmax


@dataclass
class AttentionMetadata:
    """How the flattened batch maps onto sequences and cache slots.

    Rows ``[0, num_decode)`` are single-token decodes; prefill segments follow.
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot each new K/V goes to
    num_decode: int  # leading rows that are decodes
    decode_block_tables: torch.Tensor  # (num_decode, max_blocks) int32; (0, 0) with decode_step
    decode_context_lens: torch.Tensor  # (num_decode,) int32; (0,) with decode_step
    prefills: list[PrefillSegment]
    decode_step: DecodeStep | None = None  # decode rows' places in the buffer; None = paged
    # the C++ kernels of kernels.cpu_kernels: paged decode attention, RMSNorm; the runner
    # sets it only where they are loaded and support the model
    cpu_kernels: bool = False
    # fresh prefill segments batched into one attention call (their PrefillSegment
    # entries are then skipped by the per-segment loop); None = per segment
    padded_prefill: PaddedPrefill | None = None


class Linear(nn.Linear):
    """``nn.Linear`` whose large CPU float32 inference matmuls run through
    oneDNN on a prepacked copy of the weight, as vLLM's CPU backend does:
    1.2-2x faster than the default BLAS call from about 1M multiply-adds
    (decode batches of 8+, prefill chunks, the LM head), measured on a 2-core
    AVX-512 machine; smaller calls stay on ``F.linear``, whose fixed cost is
    lower. The packed copy (weight memory x2) is rebuilt whenever the weight
    changes (its version counter moves)."""

    PACKED_MIN_MACS = 1 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] * self.weight.numel() >= self.PACKED_MIN_MACS:
            packed = self._packed_weight(x)
            if packed is not None:  # (T, in) -> (T, out)
                return torch.ops.mkldnn._linear_pointwise(
                    x.contiguous(), packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        if not (_HAS_ONEDNN_LINEAR and x.dtype == w.dtype == torch.float32
                and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not w.is_inference()):
            return None
        key = (w.data_ptr(), w._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed_key = key
        return self._packed


_HAS_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                      and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                      and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cpu_kernel: bool = False) -> torch.Tensor:
        if cpu_kernel:  # one C++ op
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and x.device.type == "cpu":
            # the ops F.rms_norm runs on CPU, bit for bit, without its two float32 copies
            return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))).mul_(
                self.weight)
        # computes in float32 and casts back before the weight, as HF does
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3 or linear scaling."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type != "llama3":
        return inv
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for the rotate-half layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # (P, D/2)
        self.register_buffer("cos", torch.cat([freqs, freqs], dim=-1).cos(), persistent=False)
        # rotate_half(x) = (-x2, x1): its minus sign is folded into the table
        signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)  # (P, D)
        self.register_buffer("sin", signed_sin, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # (T, 1, D)
        sin = self.sin[positions].unsqueeze(1).to(dtype)  # (T, 1, D)
        return cos, sin


def apply_rope_(x: torch.Tensor, rope: Rope) -> None:
    """Rotate x (T, heads, D) in place: x * cos + (x2, x1) * signed sin."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    swapped = torch.cat([x2, x1], dim=-1)  # (T, heads, D)
    x.mul_(cos).add_(swapped.mul_(sin))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which of the decode buffer's layers is ours
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, H, D) and kv (T, 2, KVH, D): views of one projection, q and k
        normed (Qwen3) and rotated in place, so K and V are written together."""
        T, H, KVH = x.shape[0], self.n_heads, self.n_kv
        qkv = self.qkv(x).view(T, H + 2 * KVH, self.head_dim)  # (T, H + 2 KVH, D)
        qk = qkv[:, :H + KVH]  # (T, H + KVH, D)
        if self.q_norm is not None:
            qk[:, :H] = self.q_norm(qk[:, :H])
            qk[:, H:] = self.k_norm(qk[:, H:])
        apply_rope_(qk, rope)  # q and k rotated in one pass
        return qkv[:, :H], qkv[:, H:].unflatten(1, (2, KVH))

    def forward(self, x, rope: Rope, meta: AttentionMetadata | None, kv_cache: LayerCache | None):
        q, kv = self.project(x, rope)
        if meta is None:
            out = self._dense(q, kv[:, 0], kv[:, 1])
        else:
            out = self._paged(q, kv, meta, kv_cache)
        return self.o_proj(out.reshape(x.shape[0], self.q_size))

    def _dense(self, q, k, v) -> torch.Tensor:
        # (1, H, T, D) x (1, KVH, T, D) -> (T, H, D)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _paged(self, q, kv, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        # (slots, 2, KVH, D)[slot] = (T, 2, KVH, D): every new key and value at once
        cache.slots.index_put_((meta.slot_mapping,), kv)
        nd = meta.num_decode
        if meta.padded_prefill is not None:
            return self._paged_padded(q, kv, meta, cache)
        parts = [self._decode(q[:nd], kv[:nd], meta, cache)] if nd else []
        for seg in meta.prefills:
            rows = slice(seg.start, seg.start + seg.num_tokens)
            parts.append(self._prefill_segment(q[rows], kv[rows, 0], kv[rows, 1], seg,
                                               cache.k, cache.v))
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # (T, H, D)

    def _paged_padded(self, q, kv, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        """Decode rows, the fresh prefill segments in one padded call, the others one by one."""
        nd, batch = meta.num_decode, meta.padded_prefill
        out = torch.empty_like(q)  # (T, H, D)
        if nd:
            out[:nd] = self._decode(q[:nd], kv[:nd], meta, cache)
        out.index_copy_(0, batch.rows, self._padded_prefill(q, kv, batch))
        for seg in meta.prefills:
            if seg.context_len != seg.num_tokens:  # attends to KV cached before it
                rows = slice(seg.start, seg.start + seg.num_tokens)
                out[rows] = self._prefill_segment(q[rows], kv[rows, 0], kv[rows, 1], seg,
                                                  cache.k, cache.v)
        return out

    def _padded_prefill(self, q, kv, batch: PaddedPrefill) -> torch.Tensor:
        """(N, H, D) attention of the fresh segments' rows, in ``batch.rows`` order.
        Padding slots copy some real row: they sit after every real query's causal
        window (never attended) and their outputs are dropped, so any finite value
        does. K/V heads are repeated for the query heads so that SDPA can take its
        fused kernels (its grouped-query option falls back to the unfused math)."""
        S, L = batch.num_seqs, batch.max_len

        def padded(x: torch.Tensor) -> torch.Tensor:  # (T, heads, D) -> (S, heads, L, D)
            x = x.index_select(0, batch.gather)  # (S * L, heads, D)
            return x.view(S, L, -1, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            padded(q), padded(self._all_heads(kv[:, 0])), padded(self._all_heads(kv[:, 1])),
            is_causal=True, scale=self.scale)  # (S, H, L, D)
        return out.transpose(1, 2).reshape(S * L, *q.shape[1:]).index_select(0, batch.slots)

    def _decode(self, q, kv, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        step = meta.decode_step
        if step is None:
            return paged_decode_attention_out(
                q, cache.k, cache.v, meta.decode_block_tables, meta.decode_context_lens,
                self.scale, impl="cpp" if meta.cpu_kernels else "auto")
        outs, first = [], 0
        for group in step.groups:  # rows [first, first + group.rows) share a bucket
            rows = slice(first, first + group.rows)
            first += group.rows
            outs.append(self._decode_group(q[rows], kv[rows], group))
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # (B, H, D)

    def _decode_group(self, q, kv, group: DecodeGroup) -> torch.Tensor:
        # (S, C, 2, KVH, D)[slot, pos] = (n, 2, KVH, D)
        group.writes[self.layer_idx].index_put_((group.slots, group.positions), kv)
        k, v = group.layers[self.layer_idx]  # each (n, KVH, L, D)
        return decode_attention(q, k, v, group.mask, self.scale)  # (n, H, D)

    def _prefill_segment(self, q, k, v, seg: PrefillSegment, k_cache, v_cache):
        n, ctx = seg.num_tokens, seg.context_len
        if ctx == n:  # nothing cached before this chunk: attend to itself
            return self._dense(q, k, v)
        block_size = k_cache.shape[1]
        blocks = seg.block_table[: -(-ctx // block_size)]
        k_ctx = k_cache[blocks].reshape(-1, self.n_kv, self.head_dim)[:ctx]  # (ctx, KVH, D)
        v_ctx = v_cache[blocks].reshape(-1, self.n_kv, self.head_dim)[:ctx]
        if q.is_cuda:  # a fused kernel, no (H, n, ctx) mask or score matrix in memory
            return self._lower_right_causal(q, k_ctx, v_ctx)
        # query i sits at position ctx - n + i and sees keys 0..ctx - n + i
        qpos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)  # (n, 1)
        mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= qpos  # (n, ctx)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k_ctx.transpose(0, 1)[None], v_ctx.transpose(0, 1)[None],
            attn_mask=mask, scale=self.scale, enable_gqa=True)  # (1, H, n, D)
        return out[0].transpose(0, 1)

    def _lower_right_causal(self, q, k, v) -> torch.Tensor:
        """(n, H, D) attention of the last n positions of a ctx-token context:
        query i sees keys 0..ctx - n + i. K/V heads are repeated for the query
        heads so that SDPA can run this as a fused kernel."""
        k, v = self._all_heads(k), self._all_heads(v)  # (ctx, H, D)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=causal_lower_right(q.shape[0], k.shape[0]), scale=self.scale)
        return out[0].transpose(0, 1)  # (n, H, D)


    def _all_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(T, KVH, D) keys or values repeated for their query heads: (T, H, D).
        SDPA's own grouped-query option runs as unfused math on CUDA (profiled)."""
        group = self.n_heads // self.n_kv
        if group == 1:
            return x
        return x.unsqueeze(2).expand(-1, -1, group, -1).flatten(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn = cfg.intermediate_size
        self.gate_up = Linear(cfg.hidden_size, 2 * self.ffn, bias=cfg.mlp_bias)
        self.down = Linear(self.ffn, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.ffn, dim=-1)  # (T, F) each
        return self.down(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope: Rope, meta: AttentionMetadata | None, kv_cache):
        fused = meta is not None and meta.cpu_kernels
        x = x + self.attn(self.input_norm(x, fused), rope, meta, kv_cache)
        return x + self.mlp(self.post_attn_norm(x, fused))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg)

    def forward(self, input_ids, positions, meta: AttentionMetadata,
                kv_caches: list[LayerCache],
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Hidden states (T, d) of a flattened batch; K/V go into ``kv_caches``.
        ``on_layer(i)`` runs as soon as layer i's K/V is in the cache (layer-wise
        KV streaming starts there while later layers compute)."""
        x = self.embed(input_ids)  # (T, d)
        rope = self.rope.tables(positions, x.dtype)
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, rope, meta, cache)
            if on_layer is not None:
                on_layer(i)
        return self.norm(x, meta.cpu_kernels)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (T, V) float32 of one sequence, full recompute, no cache."""
        x = self.embed(input_ids)
        rope = self.rope.tables(torch.arange(input_ids.shape[0], device=x.device), x.dtype)
        for layer in self.layers:
            x = layer(x, rope, None, None)
        return self.compute_logits(self.norm(x))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (n, V)


def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Deterministic random weights whose logits are spread enough that greedy
    decoding has no near-ties (so exact-token tests are meaningful)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                std = 1.0 if name.startswith("embed") else 1.0 / math.sqrt(p.shape[1])
                p.copy_(std * torch.randn(p.shape, generator=gen))

"""Merging partial attention results by log-sum-exp (KV parallelism).

Contract (``merge_attention_states`` and ``merge_attention_states_ref`` alike):

    outs  (P, B, H, D)  float dtype: attention of the same queries over P
                        disjoint KV shards, each normalised over its own shard
    lses  (P, B, H)     float32: each shard's natural-log log-sum-exp of scores

    returns out (B, H, D) in outs' dtype and lse (B, H) float32, equal to
    attention over the union of the shards:

        lse = log sum_p exp(lses[p])
        out = sum_p exp(lses[p] - lse) * outs[p]

A shard with lse = -inf (empty) contributes nothing, whatever its out holds
(even NaN). If every shard is empty, out is 0 and lse is -inf, never NaN.
The wrappers raise ValueError naming a badly shaped or typed argument.

The Triton kernel runs one program per (b, h) and folds the P shards in one
pass, rescaling the running sum whenever the running max grows.
"""

from __future__ import annotations

import torch

from kernels._dispatch import next_power_of_2, tl, triton, use_triton


def merge_attention_states(
    outs: torch.Tensor, lses: torch.Tensor, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine P shards' (out, lse) into the attention over all shards."""
    _check_inputs(outs, lses)
    if use_triton(impl, outs, _merge_states_kernel):
        return _merge_triton(outs, lses)
    return merge_attention_states_ref(outs, lses)


def merge_attention_states_ref(
    outs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference, float32 math."""
    _check_inputs(outs, lses)
    top = lses.amax(dim=0)  # (B, H)
    top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # (B, H)
    weights = torch.exp(lses - top_safe)  # (P, B, H), 0 for empty shards
    total = weights.sum(dim=0)  # (B, H)
    weighted = weights[..., None] * outs.float()  # (P, B, H, D)
    weighted = torch.where(weights[..., None] > 0, weighted, torch.zeros_like(weighted))
    total_safe = torch.where(total > 0, total, torch.ones_like(total))  # (B, H)
    out = weighted.sum(dim=0) / total_safe[..., None]  # (B, H, D)
    lse = torch.where(total > 0, top_safe + torch.log(total_safe), top)  # (B, H)
    return out.to(outs.dtype), lse


def _check_inputs(outs: torch.Tensor, lses: torch.Tensor) -> None:
    """Raise ValueError naming the argument whose rank, shape, dtype or device is wrong."""
    if outs.dim() != 4 or outs.shape[0] == 0:
        raise ValueError(f"outs must have shape (P >= 1, B, H, D), got {tuple(outs.shape)}")
    if not outs.dtype.is_floating_point:
        raise ValueError(f"outs must be a floating-point tensor, got {outs.dtype}")
    if lses.shape != outs.shape[:3]:
        raise ValueError(
            f"lses must have shape (P, B, H) = {tuple(outs.shape[:3])}, got {tuple(lses.shape)}"
        )
    if lses.dtype != torch.float32:
        raise ValueError(f"lses must be float32, got {lses.dtype}")
    if lses.device != outs.device:
        raise ValueError(f"lses is on {lses.device} but outs is on {outs.device}")


def _merge_triton(outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor | None = None,
                  lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_merge_states_kernel`` on a (B, H) grid; into ``out`` (B, H, D)
    of any float dtype and ``lse`` (B, H) float32 when given."""
    num_parts, batch, num_heads, head_dim = outs.shape
    if out is None:
        out = torch.empty(batch, num_heads, head_dim, dtype=outs.dtype, device=outs.device)
    if lse is None:
        lse = torch.empty(batch, num_heads, dtype=torch.float32, device=outs.device)  # (B, H)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    _merge_states_kernel[(batch, num_heads)](
        out, lse, outs, lses, num_parts,
        *out.stride(), *lse.stride(), *outs.stride(), *lses.stride(),
        HEAD_DIM=head_dim, HEAD_PAD=next_power_of_2(head_dim),
    )
    return out, lse


@triton.jit
def _merge_states_kernel(
    out_ptr, lse_ptr, outs_ptr, lses_ptr, num_parts,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    stride_pp, stride_pb, stride_ph, stride_pd,
    stride_sp, stride_sb, stride_sh,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """Program (b, h): fold the shards' (out, lse) with a running max."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_PAD)  # (D,)
    d_ok = offs_d < HEAD_DIM  # (D,)
    top = tl.full([], float("-inf"), tl.float32)  # running max of lses
    total = tl.full([], 0.0, tl.float32)  # running sum of exp(lse - top)
    acc = tl.zeros((HEAD_PAD,), tl.float32)  # (D,) running weighted sum of outs
    for p in range(0, num_parts):
        part_lse = tl.load(lses_ptr + p * stride_sp + b * stride_sb + h * stride_sh)
        new_top = tl.maximum(top, part_lse)
        top_safe = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp(top - top_safe)  # rescales what was summed so far
        weight = tl.exp(part_lse - top_safe)  # 0 for an empty shard
        part_offs = p * stride_pp + b * stride_pb + h * stride_ph + offs_d * stride_pd
        part = tl.load(outs_ptr + part_offs, mask=d_ok, other=0.0).to(tl.float32)  # (D,)
        acc = acc * alpha + tl.where(weight > 0, weight * part, 0.0)  # (D,)
        total = total * alpha + weight
        top = new_top
    nonempty = total > 0
    out = acc / tl.where(nonempty, total, 1.0)  # (D,)
    lse = tl.where(nonempty, top + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh, lse)

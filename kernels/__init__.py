"""Triton kernels, each beside its plain-torch reference of the same contract.

Every public wrapper takes ``impl="auto" | "triton" | "torch"`` (see
``kernels._dispatch``); ``auto`` runs Triton on CUDA tensors and torch
elsewhere. ``import kernels`` works without triton installed.

The paged decode attention wrappers also take ``impl="cpp"``: a C++ CPU
kernel (``kernels.cpu_kernels``, with the engine's other C++ CPU ops),
compiled on first use when the engine asks for it; ``auto`` never picks it.
"""

from kernels.kv_blocks import (
    gather_kv_blocks,
    gather_kv_blocks_ref,
    scatter_kv_blocks,
    scatter_kv_blocks_ref,
)
from kernels.merge_states import merge_attention_states, merge_attention_states_ref
from kernels.paged_attention import (
    decode_attention,
    paged_decode_attention,
    paged_decode_attention_out,
    paged_decode_attention_ref,
)

__all__ = [
    "decode_attention",
    "gather_kv_blocks",
    "gather_kv_blocks_ref",
    "merge_attention_states",
    "merge_attention_states_ref",
    "paged_decode_attention",
    "paged_decode_attention_out",
    "paged_decode_attention_ref",
    "scatter_kv_blocks",
    "scatter_kv_blocks_ref",
]

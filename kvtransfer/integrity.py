"""Checksums of KV blocks: CRC-32 of each block's keys then values.

Lifecycle: the sender computes them once per layer buffer, on its transport
thread (never on the engine thread), before the layer's first byte leaves;
the receiver recomputes them over the bytes as they landed in its reserved
blocks and admits a layer only when every block matches.

The CRC is zlib's CRC-32 (the polynomial of gzip and PNG). When the ``isal``
package is installed, ISA-L computes it about ten times faster with the same
values, so a sender and a receiver agree whichever of the two each one has.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from isal.isal_zlib import crc32

    CRC32_IMPL = "isal"
except ImportError:  # the same values, slower
    from zlib import crc32

    CRC32_IMPL = "zlib"


def block_checksums(buffer: torch.Tensor) -> list[int]:
    """CRC-32 per block of a layer buffer (2, num_blocks, ...): keys then values."""
    planes = buffer.detach().cpu().contiguous()
    raw = byte_rows(planes.view(2 * planes.shape[1], *planes.shape[2:]))  # (2 * n, block bytes)
    n = planes.shape[1]
    return [crc32(raw[n + b], crc32(raw[b])) for b in range(n)]


def cache_block_checksums(k_rows: np.ndarray, v_rows: np.ndarray, block_ids: list[int]
                          ) -> list[int]:
    """The same values as ``block_checksums`` of the gathered buffer, read in
    place from the blocks of a cache given as byte rows (num_blocks, block bytes)."""
    return [crc32(v_rows[b], crc32(k_rows[b])) for b in block_ids]


def byte_rows(blocks: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor (num_blocks, ...) as uint8 rows, one per block, no copy."""
    assert blocks.device.type == "cpu" and blocks.is_contiguous()
    row_bytes = blocks.element_size() * blocks[0].numel() if blocks.shape[0] else 0
    return blocks.view(-1).view(torch.uint8).numpy().reshape(blocks.shape[0], row_bytes)

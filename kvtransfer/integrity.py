"""Checksums of KV blocks: CRC-32 of each block's keys then values.

Lifecycle: the sender computes them on each gathered layer buffer before the
bytes leave; the receiver recomputes them on the reassembled buffer and
admits a layer only when every block matches.
"""

from __future__ import annotations

import zlib

import torch


def block_checksums(buffer: torch.Tensor) -> list[int]:
    """CRC-32 per block of a layer buffer (2, num_blocks, ...): keys then values."""
    planes = buffer.detach().cpu().contiguous()
    raw = planes.view(-1).view(torch.uint8).view(2, planes.shape[1], -1).numpy()
    return [zlib.crc32(raw[1, b], zlib.crc32(raw[0, b])) for b in range(planes.shape[1])]

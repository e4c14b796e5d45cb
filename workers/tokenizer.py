"""Tokenizers: the embedded byte-level one and ``tokenizer.json`` files.

Lifecycle: built once per engine by the loader (``load_tokenizer``), then used
read-only: ``encode`` on request arrival, ``IncrementalDetokenizer`` per
request while tokens stream out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus BOS/EOS/PAD. No file needed."""

    bos_token_id: int | None = BYTE_BOS
    eos_token_ids: tuple[int, ...] = (BYTE_EOS,)

    def encode(self, text: str) -> list[int]:
        return [BYTE_BOS, *text.encode("utf-8")]

    def decode(self, token_ids: list[int]) -> str:
        data = bytes(t for t in token_ids if t < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, path: Path, bos_token_id: int | None, eos_token_ids: tuple[int, ...]):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens, not the whole output, and holds
    back a delta that ends in a partial UTF-8 character (U+FFFD) until the
    next token completes it.
    """

    tokenizer: Tokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    _prefix_offset: int = 0  # window start in token_ids
    _read_offset: int = 0  # tokens already turned into text

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever text is still held back; called when the request finishes."""
        full = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
        prefix = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

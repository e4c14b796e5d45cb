"""Backbone embeddings of prompts, cached on disk so the head trains in seconds.

Lifecycle: ``EmbeddingCache(folder, encoder)`` opens (or creates) one
safetensors file per encoder setting under ``folder`` (git-ignored, by default
``~/.cache/baton/ranker``); ``get(texts)`` returns their embeddings, computing
only the prompts not cached yet (keyed by sha256 of the text) and saving them
every ``flush_every`` prompts so an interrupted run resumes. Only tensors are
read back (safetensors): nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cluster.ranker.encoder import HIDDEN, MiniLMEncoder

DEFAULT_CACHE = Path.home() / ".cache" / "baton" / "ranker"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    def __init__(self, folder: Path, encoder: MiniLMEncoder, flush_every: int = 1024):
        self.encoder = encoder
        suffix = "" if encoder.precision == "fp32" else f"-{encoder.precision}"
        depth = "" if encoder.layers == encoder.cfg.layers else f"-d{encoder.layers}"
        tuned = f"-a{encoder.adapter_id}" if encoder.adapter_id else ""
        self.path = (Path(folder)
                     / f"minilm-l6{depth}{tuned}-mean-t{encoder.max_tokens}{suffix}.safetensors")
        self.keys_path = self.path.with_suffix(".keys.json")
        self.flush_every = flush_every
        self._rows: dict[str, int] = {}
        self._emb = torch.empty(0, HIDDEN)
        if self.path.exists() and self.keys_path.exists():
            self._emb = load_file(str(self.path))["emb"]
            keys = json.loads(self.keys_path.read_text())
            self._rows = {k: i for i, k in enumerate(keys)}

    def get(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """(len(texts), 384) embeddings in input order."""
        keys = [text_key(t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._rows))
        by_key = dict(zip(keys, texts, strict=True))
        t0 = time.time()
        for s in range(0, len(todo), self.flush_every):
            part = todo[s:s + self.flush_every]
            self._add(part, self.encoder.embed([by_key[k] for k in part]))
            self._save()
            if progress:
                print(f"embedded {s + len(part)}/{len(todo)} prompts in {time.time() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        return self._emb[[self._rows[k] for k in keys]] if keys else torch.empty(0, HIDDEN)

    def _add(self, keys: list[str], emb: torch.Tensor) -> None:
        base = len(self._rows)
        self._rows.update({k: base + i for i, k in enumerate(keys)})
        self._emb = torch.cat([self._emb, emb])

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"emb": self._emb.contiguous()}, str(self.path))
        self.keys_path.write_text(json.dumps(list(self._rows)))

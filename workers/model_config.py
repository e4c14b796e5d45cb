"""Model architecture config: the facts of a Llama-family checkpoint.

Lifecycle: built once, either from a Hugging Face ``config.json``
(``ModelConfig.from_hf_dict``) or from the embedded ``tiny`` preset, then
validated in ``__post_init__`` and shared read-only by the loader, the model
and the KV cache sizing. Pure Python (no torch) so the simulator can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# HF `architectures` entries we implement, mapped to the family's quirks.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_scaling`` / ``rope_parameters``)."""

    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0  # context extension factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                "allowed: default, linear, llama3"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only Llama-family model."""

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Llama attention_bias
    o_bias: bool = False  # Llama attention_bias also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    sliding_window: int | None = None  # Mistral; None = full attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def max_model_len(self) -> int:
        """Longest sequence served exactly: with a sliding window smaller than the
        position limit, full attention equals windowed attention only inside it."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict; unknown architectures raise."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"config.json architectures={archs} names no supported architecture; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        for key in ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"config.json is missing required key {key!r}")
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if family in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        eos = cfg.get("eos_token_id")
        rope = _rope_params(cfg)
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(rope),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_tuple(eos),
            torch_dtype=_dtype_name(cfg.get("torch_dtype") or cfg.get("dtype")),
        )


def _rope_params(cfg: dict) -> dict:
    """transformers 5 writes ``rope_parameters``; older files ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    return {**legacy, **params}


def _rope_scaling(rope: dict) -> RopeScaling:
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _dtype_name(value: str | None) -> str:
    return value if value in DTYPES else "float32"


def tiny_config() -> ModelConfig:
    """The embedded default: a 4-layer d256 Llama over a byte-level vocabulary."""
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=320,  # 256 bytes + specials, padded
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=256,
        eos_token_ids=(257,),
    )


def llama_60m_config() -> ModelConfig:
    """A ~60M-parameter Llama used by benchmarks (byte-level tokenizer too)."""
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=256,
        eos_token_ids=(257,),
    )


PRESETS = {"tiny": tiny_config, "llama-60m": llama_60m_config}

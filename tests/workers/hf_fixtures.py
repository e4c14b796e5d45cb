"""Small random Hugging Face checkpoints for the parity and loader tests.

Lifecycle: a test picks an ``HFCase`` (architecture + config overrides),
``build_hf_model`` makes a transformers model with every weight re-drawn
(norms near 1, non-zero biases, unit-scale matmuls, so RoPE, bias and norm
mistakes move the logits), and ``save_hf_dir`` writes it with
``save_pretrained`` into a sharded directory plus a ``tokenizer.json`` built
with the ``tokenizers`` library. ``save_small_checkpoint`` writes one of our
own models with ``save_hf_checkpoint`` for the loader's error tests.

Imported by test files in this folder as a plain module: pytest's default
``prepend`` import mode puts the folder on ``sys.path``, as
``tests/kernels/kernel_cases.py`` relies on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.checkpoint import byte_tokenizer_json, save_hf_checkpoint
from workers.model import LlamaForCausalLM, init_dummy_weights
from workers.model_config import ModelConfig
from workers.tokenizer import BYTE_BOS, BYTE_EOS, BYTE_PAD

# Shared by every case unless overridden: 2 layers, d64, 4 heads, GQA 2.
BASE_CONFIG = {
    "vocab_size": 320,  # >= 259 byte-tokenizer ids, and the trained BPE's 300
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "bos_token_id": BYTE_BOS,
    "eos_token_id": BYTE_EOS,
    "pad_token_id": BYTE_PAD,
    "tie_word_embeddings": False,
}

# ~450 KB of fp32 weights per case, so this gives 5-7 shards.
SHARD_SIZE = "100KB"


@dataclass(frozen=True)
class HFCase:
    """One architecture variant to build, save and compare."""

    name: str  # test id
    model_class: str  # transformers class, e.g. "LlamaForCausalLM"
    config_class: str  # its config class, e.g. "LlamaConfig"
    overrides: dict = field(default_factory=dict)  # on top of BASE_CONFIG
    tokenizer: str = "byte"  # "byte" (workers.checkpoint) | "bpe" (trained here)

    def config_kwargs(self) -> dict:
        return {**BASE_CONFIG, **self.overrides}


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so head_dim 16's frequencies fall in all three bands
    # (kept, smoothed, divided by factor)
    "original_max_position_embeddings": 64,
}

HF_CASES = [
    HFCase("llama3-rope", "LlamaForCausalLM", "LlamaConfig",
           {"rope_parameters": LLAMA3_ROPE}),
    HFCase("mistral", "MistralForCausalLM", "MistralConfig",
           {"sliding_window": 64, "rope_parameters": {"rope_type": "default",
                                                      "rope_theta": 1e6}}),
    HFCase("qwen2-bias", "Qwen2ForCausalLM", "Qwen2Config",
           {"use_sliding_window": False, "bos_token_id": None, "eos_token_id": 0}, tokenizer="bpe"),
    HFCase("qwen3-qknorm", "Qwen3ForCausalLM", "Qwen3Config",
           {"head_dim": 32}),  # != 64 / 4
    HFCase("llama-tied", "LlamaForCausalLM", "LlamaConfig",
           {"tie_word_embeddings": True}),
    HFCase("llama-gqa4", "LlamaForCausalLM", "LlamaConfig",
           {"num_attention_heads": 8, "num_key_value_heads": 2}),
]


def build_hf_model(case: HFCase, seed: int = 0):
    """A transformers model of ``case`` in fp32 eval mode with random weights."""
    import transformers

    config = getattr(transformers, case.config_class)(**case.config_kwargs())
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(config).float().eval()
    randomize_weights(model, seed)
    return model


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so that no weight keeps its neutral init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is listed once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def save_hf_dir(model, case: HFCase, out_dir: Path) -> Path:
    """``save_pretrained`` in shards plus a tokenizer; returns ``out_dir``."""
    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    if case.tokenizer == "byte":
        write_tokenizer(out_dir, byte_tokenizer_json(), bos="<s>", eos="</s>")
    else:
        write_tokenizer(out_dir, trained_bpe_json(), bos=None, eos="<|endoftext|>")
    return out_dir


def write_tokenizer(out_dir: Path, tokenizer_json: str, bos: str | None, eos: str) -> None:
    (out_dir / "tokenizer.json").write_text(tokenizer_json)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
         "add_bos_token": False, "add_eos_token": False}))


BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving large language models needs paged attention and continuous batching.",
    "prefill then decode; prefill then decode; the KV cache holds the keys and values.",
    "def forward(self, x): return self.norm(x + self.attn(x))",
] * 20


def trained_bpe_json(vocab_size: int = 300) -> str:
    """A byte-level BPE (GPT-2/Qwen style, no BOS) with real merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(BPE_CORPUS, trainer)
    assert tok.get_vocab_size() <= BASE_CONFIG["vocab_size"]
    return tok.to_str()


def small_llama_config(**overrides) -> ModelConfig:
    """Our own ``ModelConfig`` of the same size as ``BASE_CONFIG`` (no transformers)."""
    fields = dict(
        architecture="LlamaForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-5, bos_token_id=BYTE_BOS, eos_token_ids=(BYTE_EOS,))
    return ModelConfig(**{**fields, **overrides})


def save_small_checkpoint(out_dir: Path, max_shard_bytes: int = 100_000, seed: int = 0) -> Path:
    """A random ``small_llama_config`` model written by ``save_hf_checkpoint``;
    the default cap gives several shards and a ``model.safetensors.index.json``."""
    model = LlamaForCausalLM(small_llama_config())
    init_dummy_weights(model, seed)
    return save_hf_checkpoint(model, out_dir, dtype="float32", max_shard_bytes=max_shard_bytes)

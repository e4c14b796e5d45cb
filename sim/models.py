"""Model catalog: architecture facts of public checkpoints, keyed by name.

Lifecycle: ``get_model(name_or_path)`` runs once per simulation and returns a
``workers.model_config.ModelConfig`` (the same class the engine loads), built
with ``ModelConfig.from_hf_dict`` from the public ``config.json`` values below,
from a preset of the engine (``tiny``, ``llama-60m``), or from a local
``config.json`` (or a directory holding one).

Each entry copies the fields of the model's Hugging Face ``config.json`` that
the latency model needs; the repository named beside it is the source.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.model_config import PRESETS, ModelConfig


def _llama(hidden, inter, layers, heads, kv, vocab, max_pos, theta=10000.0, rope=None, **extra):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
           "max_position_embeddings": max_pos, "rope_theta": theta, "torch_dtype": "bfloat16"}
    if rope:
        cfg["rope_scaling"] = rope
    cfg.update(extra)
    return cfg


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name -> (config.json facts, source repository)
HF_CONFIGS: dict[str, tuple[dict, str]] = {
    "llama-3.1-8b": (_llama(4096, 14336, 32, 32, 8, 128256, 131072, 500000.0, _LLAMA31_ROPE),
                     "meta-llama/Llama-3.1-8B config.json"),
    "llama-3.1-70b": (_llama(8192, 28672, 80, 64, 8, 128256, 131072, 500000.0, _LLAMA31_ROPE),
                      "meta-llama/Llama-3.1-70B config.json"),
    "llama-2-7b": (_llama(4096, 11008, 32, 32, 32, 32000, 4096),
                   "meta-llama/Llama-2-7b-hf config.json"),
    "llama-2-13b": (_llama(5120, 13824, 40, 40, 40, 32000, 4096),
                    "meta-llama/Llama-2-13b-hf config.json"),
    "llama-2-70b": (_llama(8192, 28672, 80, 64, 8, 32000, 4096),
                    "meta-llama/Llama-2-70b-hf config.json"),
    "mistral-7b": ({"architectures": ["MistralForCausalLM"], "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
                    "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                    "sliding_window": None, "torch_dtype": "bfloat16"},
                   "mistralai/Mistral-7B-v0.3 config.json"),
    "qwen2.5-7b": ({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
                    "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                    "max_position_embeddings": 131072, "rope_theta": 1000000.0,
                    "tie_word_embeddings": False, "use_sliding_window": False,
                    "torch_dtype": "bfloat16"},
                   "Qwen/Qwen2.5-7B config.json"),
    "qwen3-32b": ({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 5120,
                   "intermediate_size": 25600, "num_hidden_layers": 64,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
                   "vocab_size": 151936, "max_position_embeddings": 40960,
                   "rope_theta": 1000000.0, "tie_word_embeddings": False,
                   "use_sliding_window": False, "torch_dtype": "bfloat16"},
                  "Qwen/Qwen3-32B config.json"),
}

ALIASES = {"llama2-70b": "llama-2-70b", "llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b",
           "llama3.1-8b": "llama-3.1-8b", "llama3.1-70b": "llama-3.1-70b"}


def model_names() -> list[str]:
    return [*PRESETS, *HF_CONFIGS]


def get_model(name_or_path: str) -> ModelConfig:
    """A catalog name, an engine preset, or a path to a ``config.json`` (or its folder)."""
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if key in HF_CONFIGS:
        return ModelConfig.from_hf_dict(HF_CONFIGS[key][0])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    raise ValueError(f"model {name_or_path!r} is neither in the catalog ({', '.join(model_names())}) "
                     "nor a path to a Hugging Face config.json")

"""Load a model: an embedded preset (``tiny``) or a local Hugging Face directory.

Lifecycle: ``load_model(source, dtype)`` is called once per engine. For a
directory it reads ``config.json``, ``generation_config.json`` (EOS),
``tokenizer.json`` and the single or sharded ``*.safetensors`` (through
``model.safetensors.index.json``), checks every tensor's name and shape, and
fuses q/k/v and gate/up into the model's layout. Any missing file, missing
tensor or wrong shape raises ``ValueError`` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from workers.model import LlamaForCausalLM, init_dummy_weights
from workers.model_config import DTYPES, PRESETS, ModelConfig
from workers.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str  # preset name or directory path


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: {', '.join(DTYPES)}")
    return TORCH_DTYPES[name]


def load_model(source: str, dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """A preset name (``tiny``, ``llama-60m``) or a Hugging Face directory."""
    tdtype = torch_dtype(dtype)
    if source in PRESETS:
        cfg = PRESETS[source]()
        model = LlamaForCausalLM(cfg)
        init_dummy_weights(model, seed)
        return LoadedModel(model.to(tdtype).eval(), cfg, ByteTokenizer(), source)
    path = Path(source)
    if not path.is_dir():
        raise ValueError(
            f"model {source!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    cfg = read_config(path)
    model = LlamaForCausalLM(cfg)
    load_weights(model, read_safetensors(path))
    return LoadedModel(model.to(tdtype).eval(), cfg, read_tokenizer(path, cfg), str(path))


def load_tokenizer(source: str) -> Tokenizer:
    """Only the tokenizer of a preset or directory (frontends; no weights)."""
    if source in PRESETS:
        return ByteTokenizer()
    path = Path(source)
    return read_tokenizer(path, read_config(path))


def read_config(path: Path) -> ModelConfig:
    cfg = json.loads(_require(path / "config.json").read_text())
    config = ModelConfig.from_hf_dict(cfg)
    gen_file = path / "generation_config.json"
    if gen_file.exists():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if eos is not None:
            config = replace(config, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    return config


def read_tokenizer(path: Path, cfg: ModelConfig) -> HFTokenizer:
    return HFTokenizer(_require(path / "tokenizer.json"), cfg.bos_token_id, cfg.eos_token_ids)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(_require(path / name))))
    return tensors


def _require(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"missing file: {path}")
    return path


def hf_sources(name: str) -> list[str]:
    """The Hugging Face tensor names that make up one of our parameters."""
    if name == "embed.weight":
        return ["model.embed_tokens.weight"]
    if name == "norm.weight":
        return ["model.norm.weight"]
    if name == "lm_head.weight":
        return ["lm_head.weight"]
    prefix, _, rest = name.partition(".")  # "layers", "<i>.<module>.<param>"
    idx, _, rest = rest.partition(".")
    hf = f"model.layers.{idx}."
    module, _, param = rest.rpartition(".")
    return [hf + s + "." + param for s in _HF_MODULES[module]]


_HF_MODULES = {
    "input_norm": ["input_layernorm"],
    "post_attn_norm": ["post_attention_layernorm"],
    "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.o_proj": ["self_attn.o_proj"],
    "attn.q_norm": ["self_attn.q_norm"],
    "attn.k_norm": ["self_attn.k_norm"],
    "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down": ["mlp.down_proj"],
}


def load_weights(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF tensors into the model, fusing where our layout is fused."""
    params = dict(model.named_parameters())  # tied lm_head is listed once, as embed
    with torch.no_grad():
        for name, param in params.items():
            parts = [_tensor(tensors, src) for src in hf_sources(name)]
            if len(parts) > 1:  # check before cat, which would raise a RuntimeError
                for src, part in zip(hf_sources(name), parts, strict=True):
                    _check_trailing_dims(src, part, param)
            value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if value.shape != param.shape:
                raise ValueError(
                    f"tensor {', '.join(hf_sources(name))} has shape {tuple(value.shape)}, "
                    f"expected {tuple(param.shape)} from config.json")
            param.copy_(value.to(param.dtype))


def _tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"checkpoint is missing tensor {name!r}")
    return tensors[name]


def _check_trailing_dims(name: str, part: torch.Tensor, param: torch.Tensor) -> None:
    """Fused parts are stacked on dim 0; every other dim must match the model's."""
    if part.dim() != param.dim() or part.shape[1:] != param.shape[1:]:
        want = "(rows" + "".join(f", {d}" for d in param.shape[1:]) + ")"
        raise ValueError(
            f"tensor {name} has shape {tuple(part.shape)}, expected {want} from config.json")

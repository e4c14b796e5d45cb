"""Write a model as a Hugging Face directory (config, sharded safetensors,
tokenizer.json, generation_config.json).

Lifecycle: called by tools and tests (``python -m workers.checkpoint tiny DIR``)
to put the embedded presets on disk, so that other engines (transformers,
vLLM) and our own loader read the very same weights and tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from workers.loader import hf_sources, load_model
from workers.model import LlamaForCausalLM
from workers.model_config import ModelConfig
from workers.tokenizer import BYTE_BOS, BYTE_EOS, BYTE_PAD


def hf_config_dict(cfg: ModelConfig, dtype: str) -> dict:
    return {
        "architectures": [cfg.architecture],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids)[0] if cfg.eos_token_ids else None,
        "torch_dtype": dtype,
    }


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Split our fused parameters back into Hugging Face tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        sources = hf_sources(name)
        sizes = _split_sizes(model.cfg, name, param.shape[0], len(sources))
        for src, part in zip(sources, param.detach().split(sizes, dim=0)):
            out[src] = part.contiguous().clone()
    return out


def _split_sizes(cfg: ModelConfig, name: str, rows: int, n: int) -> list[int]:
    if n == 1:
        return [rows]
    if ".qkv." in name:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]  # gate_up


def byte_tokenizer_json() -> str:
    """A ``tokenizers`` file that encodes exactly like ``ByteTokenizer``:
    BOS then one token per UTF-8 byte (id = byte value)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BYTE_BOS)])
    assert tok.token_to_id("<s>") == BYTE_BOS and tok.token_to_id("</s>") == BYTE_EOS
    assert tok.token_to_id("<pad>") == BYTE_PAD
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def save_hf_checkpoint(model: LlamaForCausalLM, out_dir: str | Path, dtype: str = "float32",
                       max_shard_bytes: int = 2 << 30, tokenizer_json: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory; shards above the size cap."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}, indent=2))
    (out / "tokenizer.json").write_text(tokenizer_json or byte_tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_model_len},
        indent=2))
    tensors = {k: v.to(torch.float32 if dtype == "float32" else getattr(torch, dtype))
               for k, v in hf_state_dict(model).items()}
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _shard(tensors: dict[str, torch.Tensor], cap: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > cap:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a preset model as a HF directory")
    parser.add_argument("preset", help="tiny | llama-60m")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    loaded = load_model(args.preset, "float32", seed=args.seed)
    print(save_hf_checkpoint(loaded.model, args.out_dir, dtype=args.dtype))


if __name__ == "__main__":
    main()

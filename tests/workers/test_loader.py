"""``load_model`` on broken directories (each error names what is wrong) and
``read_config`` on the config.json details that change serving limits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hf_fixtures import save_small_checkpoint
from safetensors.torch import load_file, save_file

from workers.loader import load_model, read_config
from workers.model_config import RopeScaling


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A fresh sharded checkpoint (hidden 64, 2 layers) each test may break."""
    return save_small_checkpoint(tmp_path / "ckpt")


def shard_of(ckpt: Path, tensor: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"][tensor]


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def replace_tensor(ckpt: Path, name: str, value: torch.Tensor | None) -> None:
    """Rewrite the shard holding ``name`` with ``value`` (None: drop it)."""
    shard = shard_of(ckpt, name)
    tensors = load_file(str(shard))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_small_checkpoint_loads(ckpt):
    loaded = load_model(str(ckpt))
    assert loaded.config.hidden_size == 64 and loaded.name == str(ckpt)
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1


# -- errors that name the culprit ----------------------------------------------

def test_unsupported_architecture(ckpt):
    edit_json(ckpt / "config.json", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"architectures=\['GPT2LMHeadModel'\] names no supported"):
        load_model(str(ckpt))


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match=r"missing file: .*config\.json$"):
        load_model(str(ckpt))


def test_missing_tokenizer_json(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"missing file: .*tokenizer\.json$"):
        load_model(str(ckpt))


def test_missing_shard_named_in_index(ckpt):
    shard = shard_of(ckpt, "model.layers.1.mlp.down_proj.weight")
    shard.unlink()
    with pytest.raises(ValueError, match=rf"missing file: .*{re.escape(shard.name)}$"):
        load_model(str(ckpt))


def test_missing_tensor(ckpt):
    replace_tensor(ckpt, "model.layers.1.mlp.up_proj.weight", None)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(str(ckpt))


def test_wrong_shape_unfused_tensor(ckpt):
    replace_tensor(ckpt, "model.embed_tokens.weight", torch.zeros(320, 32))
    with pytest.raises(ValueError, match=re.escape(
            "tensor model.embed_tokens.weight has shape (320, 32), expected (320, 64)")):
        load_model(str(ckpt))


def test_wrong_shape_fused_part(ckpt):
    # k_proj's input dim is 32 but config.json says hidden 64: q/k/v cannot be fused
    replace_tensor(ckpt, "model.layers.0.self_attn.k_proj.weight", torch.zeros(32, 32))
    with pytest.raises(ValueError, match=re.escape(
            "tensor model.layers.0.self_attn.k_proj.weight has shape (32, 32), "
            "expected (rows, 64)")):
        load_model(str(ckpt))


def test_wrong_rows_fused_tensor(ckpt):
    # gate_proj with 64 rows where config.json says intermediate 128
    replace_tensor(ckpt, "model.layers.1.mlp.gate_proj.weight", torch.zeros(64, 64))
    with pytest.raises(ValueError, match=re.escape(
            "tensor model.layers.1.mlp.gate_proj.weight, model.layers.1.mlp.up_proj.weight "
            "has shape (192, 64), expected (256, 64)")):
        load_model(str(ckpt))


def test_no_safetensors_files(ckpt):
    for path in ckpt.glob("*.safetensors*"):
        path.unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors files in .*ckpt"):
        load_model(str(ckpt))


def test_unknown_preset_or_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=rf"model {re.escape(repr(missing))} is neither a preset"):
        load_model(missing)
    with pytest.raises(ValueError, match=r"model 'llama-7b' is neither a preset \(tiny, llama-60m\)"):
        load_model("llama-7b")


def test_unsupported_dtype():
    with pytest.raises(ValueError, match=r"dtype='float64' is not supported; allowed: float32, "
                                         r"float16, bfloat16"):
        load_model("tiny", dtype="float64")


def test_missing_required_config_key(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["intermediate_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing required key 'intermediate_size'"):
        load_model(str(ckpt))


# -- config.json / generation_config.json details ------------------------------

BASE_HF = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def config_dir(path: Path, arch: str, generation: dict | None = None, **keys) -> Path:
    """A directory holding only config.json (and generation_config.json if given)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": [arch], **BASE_HF, **keys}))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_eos_list_in_generation_config_overrides_config_json(tmp_path):
    path = config_dir(tmp_path, "LlamaForCausalLM", generation={"eos_token_id": [128001, 128009]},
                      eos_token_id=128001, bos_token_id=128000)
    cfg = read_config(path)
    assert cfg.eos_token_ids == (128001, 128009)
    assert cfg.bos_token_id == 128000


def test_eos_from_config_json_without_generation_config(tmp_path):
    cfg = read_config(config_dir(tmp_path, "LlamaForCausalLM", eos_token_id=2))
    assert cfg.eos_token_ids == (2,)


def test_eos_int_in_generation_config(tmp_path):
    path = config_dir(tmp_path, "LlamaForCausalLM", generation={"eos_token_id": 7},
                      eos_token_id=[2, 3])
    assert read_config(path).eos_token_ids == (7,)


def test_qwen2_use_sliding_window_false_means_full_attention(tmp_path):
    path = config_dir(tmp_path, "Qwen2ForCausalLM", sliding_window=32, use_sliding_window=False)
    cfg = read_config(path)
    assert cfg.sliding_window is None
    assert cfg.max_model_len == 4096
    assert cfg.qkv_bias is True and cfg.o_bias is False


def test_qwen2_use_sliding_window_true_keeps_window(tmp_path):
    path = config_dir(tmp_path, "Qwen2ForCausalLM", sliding_window=32, use_sliding_window=True)
    cfg = read_config(path)
    assert cfg.sliding_window == 32
    assert cfg.max_model_len == 32


def test_mistral_sliding_window_caps_max_model_len(tmp_path):
    cfg = read_config(config_dir(tmp_path, "MistralForCausalLM", sliding_window=32))
    assert cfg.sliding_window == 32
    assert cfg.max_position_embeddings == 4096
    assert cfg.max_model_len == 32


def test_mistral_null_sliding_window(tmp_path):
    cfg = read_config(config_dir(tmp_path, "MistralForCausalLM", sliding_window=None))
    assert cfg.sliding_window is None and cfg.max_model_len == 4096


@pytest.mark.parametrize(("keys", "head_dim"), [
    ({}, 16),  # derived: 64 / 4
    ({"head_dim": None}, 16),  # transformers writes null for "derive it"
    ({"head_dim": 32}, 32),  # explicit, Qwen3 style (q width 128 != hidden 64)
])
def test_head_dim_explicit_or_derived(tmp_path, keys, head_dim):
    cfg = read_config(config_dir(tmp_path, "Qwen3ForCausalLM", **keys))
    assert cfg.head_dim == head_dim
    assert cfg.qk_norm is True
    assert cfg.kv_bytes_per_token(2) == 2 * 2 * 2 * head_dim * 2


def test_llama3_rope_parameters_and_legacy_rope_scaling_agree(tmp_path):
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    new = read_config(config_dir(tmp_path / "v5", "LlamaForCausalLM",
                                 rope_parameters={**rope, "rope_theta": 500000.0}))
    old = read_config(config_dir(tmp_path / "v4", "LlamaForCausalLM",
                                 rope_scaling=rope, rope_theta=500000.0))
    assert new == old
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_num_kv_heads_defaults_to_num_heads(tmp_path):
    cfg = read_config(config_dir(tmp_path, "LlamaForCausalLM", num_key_value_heads=None))
    assert (cfg.num_heads, cfg.num_kv_heads) == (4, 4)

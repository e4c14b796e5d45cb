"""Our loader + ``forward_dense`` against transformers on the same checkpoints.

Each architecture case is a small random transformers model saved with
``save_pretrained`` in shards; our ``load_model(dir)`` must read the config
facts exactly, give logits within 1e-4 of transformers' forward and encode
text exactly as ``AutoTokenizer`` does. The embedded ``tiny`` preset goes the
other way: written by ``save_hf_checkpoint``, it must load back bit-identical
in our model and within 1e-4 in transformers (benchmark peers read the very
same weights and tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hf_fixtures import HF_CASES, HFCase, build_hf_model, save_hf_dir

from workers.checkpoint import save_hf_checkpoint
from workers.loader import LoadedModel, load_model
from workers.model_config import RopeScaling
from workers.tokenizer import ByteTokenizer

ATOL = 1e-4
SEQ_LENS = [1, 7, 50]
TEXTS = [
    "Hello, world!",
    "prefill then decode; the KV cache holds keys and values.",
    "  two  spaces,\ttab,\nnewline and digits 1234567 3.14",
    "héllo wörld 日本語 🙂",
]

# Config facts our loader must read from each case's directory.
EXPECTED_CONFIG = {
    "llama3-rope": {
        "architecture": "LlamaForCausalLM", "head_dim": 16, "num_kv_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
        "max_model_len": 128,
    },
    "mistral": {
        "architecture": "MistralForCausalLM", "head_dim": 16, "rope_theta": 1e6,
        "sliding_window": 64, "max_model_len": 64, "rope_scaling": RopeScaling(),
    },
    "qwen2-bias": {
        "architecture": "Qwen2ForCausalLM", "qkv_bias": True, "o_bias": False,
        "sliding_window": None, "max_model_len": 128, "bos_token_id": None,
        "eos_token_ids": (0,),
    },
    "qwen3-qknorm": {
        "architecture": "Qwen3ForCausalLM", "head_dim": 32, "qk_norm": True,
        "qkv_bias": False, "sliding_window": None,
    },
    "llama-tied": {"tie_word_embeddings": True, "head_dim": 16},
    "llama-gqa4": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 8},
}


@pytest.fixture(scope="module", params=HF_CASES, ids=lambda c: c.name)
def hf_case(request, tmp_path_factory) -> tuple[HFCase, torch.nn.Module, Path, LoadedModel]:
    """(case, transformers model, its sharded directory, our load of it)."""
    case: HFCase = request.param
    model = build_hf_model(case, seed=0)
    out = save_hf_dir(model, case, tmp_path_factory.mktemp(case.name))
    return case, model, out, load_model(str(out))


def token_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen)


def test_checkpoint_is_sharded(hf_case):
    case, _, out, _ = hf_case
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert shards == {p.name for p in out.glob("*.safetensors")}
    names = index["weight_map"]
    assert ("lm_head.weight" in names) == (case.name != "llama-tied")
    assert ("model.layers.1.self_attn.k_proj.bias" in names) == (case.name == "qwen2-bias")
    assert ("model.layers.1.self_attn.q_norm.weight" in names) == (case.name == "qwen3-qknorm")


def test_config_facts(hf_case):
    case, _, _, loaded = hf_case
    got = {key: getattr(loaded.config, key) for key in EXPECTED_CONFIG[case.name]}
    assert got == EXPECTED_CONFIG[case.name]


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_logits_match_transformers(hf_case, seq_len):
    _, model, _, loaded = hf_case
    ids = token_ids(seq_len, loaded.config.vocab_size, seed=seq_len)
    with torch.inference_mode():
        ours = loaded.model.forward_dense(ids)  # (T, V)
        theirs = model(ids[None]).logits[0].float()  # (T, V)
    assert ours.shape == theirs.shape == (seq_len, loaded.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_tokenizer_matches_transformers(hf_case):
    case, _, out, loaded = hf_case
    auto = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for text in TEXTS:
        ours = loaded.tokenizer.encode(text)
        assert ours == auto(text)["input_ids"], text
        assert loaded.tokenizer.decode(ours) == text
        if case.tokenizer == "byte":
            assert ours == ByteTokenizer().encode(text)


@pytest.fixture(scope="module", params=["sharded", "single"])
def tiny_dir(request, tmp_path_factory, tiny_model) -> Path:
    """The ``tiny`` preset written by ``save_hf_checkpoint``."""
    shard_bytes = 200_000 if request.param == "sharded" else 2 << 30
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    save_hf_checkpoint(tiny_model.model, out, dtype="float32", max_shard_bytes=shard_bytes)
    assert (out / "model.safetensors.index.json").exists() == (request.param == "sharded")
    return out


def test_tiny_checkpoint_reloads_bit_identical(tiny_dir, tiny_model):
    loaded = load_model(str(tiny_dir))
    assert loaded.config == tiny_model.config
    for seq_len in [*SEQ_LENS, 300]:
        ids = token_ids(seq_len, 259, seed=seq_len)
        with torch.inference_mode():
            assert torch.equal(loaded.model.forward_dense(ids), tiny_model.model.forward_dense(ids))


def test_tiny_checkpoint_matches_transformers(tiny_dir, tiny_model):
    hf, info = transformers.LlamaForCausalLM.from_pretrained(
        str(tiny_dir), local_files_only=True, dtype=torch.float32,
        attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    for seq_len in [*SEQ_LENS, 300]:
        ids = token_ids(seq_len, 259, seed=seq_len)
        with torch.inference_mode():
            ours = tiny_model.model.forward_dense(ids)
            theirs = hf(ids[None]).logits[0].float()
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_tiny_checkpoint_tokenizer_matches_transformers(tiny_dir):
    auto = transformers.AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    loaded = load_model(str(tiny_dir))
    for text in TEXTS:
        expected = ByteTokenizer().encode(text)
        assert auto(text)["input_ids"] == expected
        assert loaded.tokenizer.encode(text) == expected
    assert auto.eos_token_id == 257 and auto.bos_token_id == 256

"""Peer runner: Hugging Face transformers ``generate`` on the same directory.

Run by ``benchmarks/engine_throughput.py`` with the project's venv
(transformers is a dev dependency): ``python benchmarks/peers/hf_peer.py
SPEC.json`` (see ``common.py``). The batch is left-padded with an attention
mask; greedy (``do_sample=False``), KV cache on, EOS ignored (no EOS id in the
generation config, so every row runs ``max_new_tokens``), fp32,
``torch.inference_mode``; ``spec["threads"]`` intra-op threads (None:
torch's default); ``spec["device"]`` (default cpu) holds model and batch.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import main  # noqa: E402


def load(spec: dict):
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    device = torch.device(spec.get("device", "cpu"))
    model = LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device).eval()
    pad_id = spec.get("pad_token_id", 0)

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, use_cache=True,
                               eos_token_id=None, pad_token_id=pad_id, bos_token_id=None)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gen)
        return out[:, width:].tolist()

    return run


def threads() -> str:
    import torch

    return str(torch.get_num_threads())


if __name__ == "__main__":
    main("hf", load, ("torch", "transformers"), threads=threads)

"""Peer runner: Baton's ``LLMEngine`` loading the Hugging Face directory.

Run by ``benchmarks/engine_throughput.py`` with the project's own venv:
``python benchmarks/peers/baton_peer.py SPEC.json`` (see ``common.py``).
Prefix caching is off: every repetition sends the same prompts, and reusing
the previous repetition's KV would time no prefill at all. ``spec["threads"]``
becomes ``EngineConfig.num_threads`` (None: torch's default);
``spec["baton"]["cpu_kernels"]`` becomes ``EngineConfig.cpu_kernels``
(their one-time build happens here, in ``load``, before anything is timed);
``spec["device"]`` becomes ``EngineConfig.device``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from common import main  # noqa: E402


def load(spec: dict):
    from workers.engine import EngineConfig, LLMEngine
    from workers.sampling import SamplingParams

    opts = spec.get("baton", {})
    batch = max(len(c["prompts"]) for c in spec["cases"])
    block_size = 16
    # KV for the largest batch at full length, plus slack: no preemption.
    blocks = max(sum(-(-(len(p) + spec["output_len"]) // block_size) for p in c["prompts"])
                 for c in spec["cases"]) + 64
    engine = LLMEngine(EngineConfig(
        model=spec["model_dir"], dtype=spec["dtype"], block_size=block_size,
        num_kv_blocks=blocks, max_num_seqs=max(batch, 1),
        max_num_batched_tokens=opts.get("max_num_batched_tokens", 4096),
        prefill_chunk_size=opts.get("prefill_chunk_size", 512),
        enable_prefix_caching=False, num_threads=spec.get("threads"),
        cpu_kernels=bool(opts.get("cpu_kernels", False)), device=spec.get("device", "cpu")))

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [c.token_ids for c in engine.generate(prompts, params)]

    return run


def threads() -> str:
    import torch

    return str(torch.get_num_threads())


if __name__ == "__main__":
    main("baton", load, threads=threads)

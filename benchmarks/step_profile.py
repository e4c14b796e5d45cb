"""Where an engine step's time goes: cProfile over a batch run to completion.

Usage::

    python benchmarks/step_profile.py [--model tiny] [--batch 32] [--device cuda] [--top 25]

Runs one warm-up batch, then profiles ``generate`` of ``--batch`` prompts
(token ids, lengths uniform in 16..256, greedy, ``--output-len`` tokens,
EOS ignored) and prints the functions with the most own time, with the
steps and wall time per step. On CUDA the device work is asynchronous: time
shows up where the host waits (``.tolist()`` of the sampled tokens).
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
    args = ap.parse_args(argv)

    from workers.engine import EngineConfig, LLMEngine
    from workers.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    enable_prefix_caching=False, max_num_seqs=args.batch,
                                    kv_cache_bytes=512 << 20))
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(16, 256))]
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up
    steps0 = engine.stats.steps
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    engine.generate(prompts, params)
    prof.disable()
    wall = time.perf_counter() - t0
    steps = engine.stats.steps - steps0
    print(f"{args.model} batch {args.batch} on {args.device}: {steps} steps, "
          f"{wall * 1e3:.0f} ms, {wall / steps * 1e3:.2f} ms/step (profiled)")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()

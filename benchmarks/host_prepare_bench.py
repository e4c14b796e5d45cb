"""Host time of one engine step's input layout (``ModelRunner._prepare``).

Usage::

    .venv/bin/python benchmarks/host_prepare_bench.py [--batch 32] [--json FILE]

On a GPU the runner builds each step's token ids, positions, KV slots, block
tables and the padded-prefill layout on the host, then copies them over; for
small models that host work can take longer than the step's kernels. This
times ``_prepare`` alone (CPU tensors, the GPU layout forced on:
``padded_prefill``) for three steps of the tiny model: ``--batch`` fresh
prompts of 16-256 tokens (seed 0), ``--batch`` decodes, and those decodes
plus 4 of the prompts. Best of 7 rounds of 100 calls, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def steps(batch: int, block_size: int, seed: int = 0) -> dict:
    from workers.model_runner import RunItem

    rng, items, nxt = random.Random(seed), [], 0
    for i in range(batch):
        n = rng.randint(16, 256)
        nb = -(-n // block_size)
        items.append(RunItem([rng.randrange(256) for _ in range(n)], 0,
                             list(range(nxt, nxt + nb)), "last", f"p{i}"))
        nxt += nb
    decodes = [RunItem([5], 100 + i, list(range(nxt + 10 * i, nxt + 10 * i + 10)), "last", f"d{i}")
               for i in range(batch)]
    return {f"{batch} prompts": items, f"{batch} decodes": decodes,
            f"{batch} decodes + 4 prompts": decodes + items[:4]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from workers.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny", enable_prefix_caching=False,
                                    max_num_seqs=2 * args.batch, kv_cache_bytes=512 << 20))
    runner = engine.runner
    runner.padded_prefill = True  # the GPU's layout
    out = {}
    for name, items in steps(args.batch, runner.kv.block_size).items():
        for _ in range(20):
            runner._prepare(items, None)
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(100):
                runner._prepare(items, None)
            best = min(best, (time.perf_counter() - t0) / 100)
        out[name] = round(best * 1e6, 1)
        print(f"{name:>24}: {out[name]:8.1f} us per _prepare", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "host_prepare", "us": out}, indent=1))


if __name__ == "__main__":
    main()

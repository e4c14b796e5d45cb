"""In-process engine demo: a batch of prompts through ``LLMEngine``.

Lifecycle: build the engine on the embedded tiny model, queue a batch of
prompts of mixed lengths, step until done while streaming two of them to the
terminal, then print throughput (or a JSON object with ``--json``).
The tiny model has random weights: its text is meaningless by design.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass

from workers.engine import EngineConfig, LLMEngine
from workers.sampling import SamplingParams

WORDS = ("serving", "prefill", "decode", "cache", "token", "batch", "latency", "cluster",
         "transfer", "ranker", "policy", "block", "layer", "stream", "worker", "queue")


@dataclass
class DemoReport:
    model: str
    num_requests: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    prefill_tok_s: float  # prompt tokens per second of engine time spent on prefill-bearing steps
    decode_tok_s: float  # generated tokens per second of wall time after the first token
    ttft_s: float  # time to the first token of the whole batch


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


def run_engine_demo(model: str = "tiny", num_requests: int = 16, max_tokens: int = 48,
                    stream: bool = True, out=sys.stdout) -> DemoReport:
    engine = LLMEngine(EngineConfig(model=model, prefill_chunk_size=256))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = demo_prompts(num_requests)
    for i, p in enumerate(prompts):
        engine.add_request(f"req-{i}", p, params)
    shown = {"req-0", "req-1"}
    prompt_tokens = sum(len(engine.sequence(f"req-{i}").prompt_token_ids) for i in range(len(prompts)))
    t0 = time.perf_counter()
    first = None
    generated = 0
    for output in engine.stream():
        first = first or time.perf_counter()
        generated += len(output.new_token_ids)
        if stream and output.request_id in shown:
            print(f"[{output.request_id}] token {output.new_token_ids[0]}"
                  + (f"  finished: {output.finish_reason.value}" if output.finished else ""),
                  file=out, flush=True)
    wall = time.perf_counter() - t0
    ttft = (first or time.perf_counter()) - t0
    return DemoReport(model, len(prompts), prompt_tokens, generated, wall,
                      prompt_tokens / ttft if ttft else 0.0,
                      (generated - len(prompts)) / max(wall - ttft, 1e-9), ttft)


def print_report(report: DemoReport, as_json: bool, out=sys.stdout) -> None:
    if as_json:
        print(json.dumps(asdict(report), indent=2), file=out)
        return
    rows = [("model", report.model), ("requests", report.num_requests),
            ("prompt tokens", report.prompt_tokens), ("generated tokens", report.generated_tokens),
            ("time to first token (batch)", f"{report.ttft_s * 1e3:.1f} ms"),
            ("prefill throughput", f"{report.prefill_tok_s:,.0f} tok/s"),
            ("decode throughput", f"{report.decode_tok_s:,.0f} tok/s"),
            ("wall time", f"{report.wall_s:.2f} s")]
    width = max(len(k) for k, _ in rows)
    print("", file=out)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)

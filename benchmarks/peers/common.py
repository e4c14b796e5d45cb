"""Shared harness of the peer runners (stdlib only: it also runs inside
``.bench-venv-vllm``, which has no Baton on its path).

A peer is started as ``python benchmarks/peers/<engine>_peer.py SPEC.json``
by ``benchmarks/engine_throughput.py``, in its own process, so only one engine
uses the cores at a time. The spec names the model directory, the output
length, the repetitions and, per batch size, the prompts as token ids. The
peer loads its engine once, then per batch runs ``measure`` and prints one
line ``@@BENCH {json}`` per event on stdout (``progress`` lines while it
works, one ``result`` line per batch, ``done`` at the end): engines log
freely to stdout/stderr, so the parent only reads lines with that prefix.
``spec["threads"]`` (when set) is the intra-op thread count Baton and HF
must use, so both run with the same number in a row.

Timing of one batch (all prompts submitted at once, greedy, EOS ignored):
- a run with ``max_tokens=1`` lasts the time to the first token of the whole
  batch (``prefill_s``);
- a run with ``max_tokens=N`` lasts ``total_s``;
- after one warm-up of each, ``reps`` pairs (prefill run, full run) are timed
  and the medians kept: prefill tok/s = prompt tokens / median prefill_s,
  decode tok/s = B * (N - 1) / (median total_s - median prefill_s).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

PREFIX = "@@BENCH "

# run(prompts, max_tokens) -> list of generated token ids per prompt
RunFn = Callable[[list[list[int]], int], list[list[int]]]


def emit(event: str, **fields) -> None:
    print(PREFIX + json.dumps({"event": event, **fields}), flush=True)


def load_spec(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: <peer>.py SPEC.json")
    with open(argv[0]) as f:
        return json.load(f)


def measure(run: RunFn, prompts: list[list[int]], output_len: int, reps: int,
            warmup: int = 1, on_rep: Callable[[], None] | None = None) -> dict:
    """Warm-up, then ``reps`` timed (prefill, full) pairs; medians and raw times."""
    for _ in range(warmup):
        run(prompts, 1)
        run(prompts, output_len)
    prefill_s, total_s, tokens = [], [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        first = run(prompts, 1)
        prefill_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tokens = run(prompts, output_len)
        total_s.append(time.perf_counter() - t0)
        _check_lengths(first, 1)
        _check_lengths(tokens, output_len)
        if on_rep:
            on_rep()
    p, t = statistics.median(prefill_s), statistics.median(total_s)
    prompt_tokens = sum(len(x) for x in prompts)
    decode_tokens = len(prompts) * (output_len - 1)
    decode_s = t - p
    return {
        "batch": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_len": output_len,
        "prefill_s": p,
        "total_s": t,
        "prefill_tok_s": prompt_tokens / p,
        "decode_tok_s": decode_tokens / decode_s if decode_s > 0 and decode_tokens else None,
        "prefill_s_all": prefill_s,
        "total_s_all": total_s,
        "token_ids": tokens,
    }


def _check_lengths(outputs: list[list[int]], n: int) -> None:
    bad = [len(o) for o in outputs if len(o) != n]
    if bad:
        raise RuntimeError(f"expected {n} generated tokens per prompt, got lengths {bad[:4]}")


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main(engine: str, load: Callable[[dict], RunFn], packages: tuple[str, ...] = ("torch",),
         threads: Callable[[], str] | None = None) -> None:
    """``threads()`` (called after ``load``) says what compute threads the
    engine runs with, for the report."""
    spec = load_spec()
    t0 = time.perf_counter()
    run = load(spec)
    emit("loaded", engine=engine, load_s=time.perf_counter() - t0, versions=versions(packages),
         threads=threads() if threads else None)
    for case in spec["cases"]:
        batch = len(case["prompts"])
        result = measure(run, case["prompts"], spec["output_len"], spec["reps"],
                         spec.get("warmup", 1),
                         on_rep=lambda b=batch: emit("progress", engine=engine, batch=b))
        emit("result", engine=engine, **result)
    emit("done", engine=engine)

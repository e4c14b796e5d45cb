"""Requests and arrival times for ``baton bench``.

Lifecycle: ``load_requests`` builds the whole list up front (prompt, output
length) from a dataset; ``arrival_offsets`` gives each its send time. Pure
and seeded, so two runs with one seed send the same load.

Datasets: ``sharegpt`` (real prompt text; the output length is the original
response's, in tokens estimated as bytes / 4 unless a tokenizer is given),
``azure-conv`` / ``azure-code`` / ``mooncake`` (token counts from the traces
the simulator uses; prompts are random token ids of that length) and
``random`` (uniform lengths around ``--input-len`` / ``--output-len``).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("sharegpt", "azure-conv", "azure-code", "mooncake", "random")


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids
    prompt_tokens: int  # known for token prompts; estimated for text
    output_tokens: int  # max_tokens sent (EOS ignored)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_prompts: int
    seed: int = 0
    path: Path | None = None  # a ShareGPT-style .jsonl(.gz) file or folder; traces: a file
    input_len: int = 128  # random
    output_len: int = 64  # random
    range_ratio: float = 0.5  # random: lengths uniform in [len*(1-r), len*(1+r)]
    max_input_tokens: int | None = None  # clip (traces and ShareGPT)
    max_output_tokens: int | None = None
    vocab_size: int = 256  # token ids of synthetic prompts are drawn from [0, vocab_size)
    tokenizer: object | None = None  # with encode(); ShareGPT lengths exact when given


def load_requests(spec: DatasetSpec) -> list[BenchRequest]:
    if spec.name not in DATASETS:
        raise ValueError(f"--dataset: {spec.name!r} is not one of {', '.join(DATASETS)}")
    rng = random.Random(spec.seed)
    if spec.name == "sharegpt":
        return _sharegpt(spec, rng)
    if spec.name == "random":
        return [_synthetic(_around(spec.input_len, spec.range_ratio, rng),
                           _around(spec.output_len, spec.range_ratio, rng), spec, rng)
                for _ in range(spec.num_prompts)]
    from sim.workload import load_trace

    rows = load_trace(spec.name, spec.path.parent if spec.path else _shared_data())
    picked = [rows[rng.randrange(len(rows))] for _ in range(spec.num_prompts)]
    return [_synthetic(_clip(r.prompt_tokens, spec.max_input_tokens),
                       _clip(r.output_tokens, spec.max_output_tokens), spec, rng) for r in picked]


def arrival_offsets(n: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times: all at 0 for an infinite rate, else gamma gaps with mean
    1/rate and shape ``burstiness`` (1.0 = Poisson; < 1 burstier)."""
    if request_rate == float("inf"):
        return [0.0] * n
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
    return out


def _shared_data() -> Path:
    from sim.workload import SHARED_DATA

    return SHARED_DATA


def _sharegpt(spec: DatasetSpec, rng: random.Random) -> list[BenchRequest]:
    rows = _sharegpt_rows(spec.path or _shared_data() / "prompts")
    rng.shuffle(rows)
    out = []
    for prompt, response in rows:
        if len(out) == spec.num_prompts:
            break
        n_in, n_out = (_count(spec.tokenizer, prompt), _count(spec.tokenizer, response))
        if spec.max_input_tokens and n_in > spec.max_input_tokens:
            continue  # a long prompt is skipped, not cut: its text stays real
        out.append(BenchRequest(prompt, n_in, _clip(n_out, spec.max_output_tokens)))
    if len(out) < spec.num_prompts:
        raise ValueError(f"--dataset sharegpt: only {len(out)} prompts fit "
                         f"--max-input-tokens {spec.max_input_tokens}")
    return out


def _sharegpt_rows(path: Path) -> list[tuple[str, str]]:
    files = sorted(path.glob("*.jsonl*")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"--dataset-path: no .jsonl(.gz) files under {path}")
    rows = []
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            for line in fh:
                r = json.loads(line)
                if r.get("prompt") and r.get("response"):
                    rows.append((r["prompt"], r["response"]))
    return rows


def _count(tokenizer, text: str) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text))
    return max(1, round(len(text.encode()) / 4))


def _synthetic(n_in: int, n_out: int, spec: DatasetSpec, rng: random.Random) -> BenchRequest:
    ids = [rng.randrange(spec.vocab_size) for _ in range(max(1, n_in))]
    return BenchRequest(ids, len(ids), max(1, n_out))


def _around(length: int, ratio: float, rng: random.Random) -> int:
    return max(1, rng.randint(int(length * (1 - ratio)), int(length * (1 + ratio))))


def _clip(n: int, limit: int | None) -> int:
    return max(1, min(n, limit) if limit else n)

"""Workloads: which requests arrive when, with how many prompt and output tokens.

Lifecycle: a ``WorkloadSpec`` (validated at construction) is turned by
``build_workload`` into a ``Workload``; the simulator takes its ``initial()``
requests at start and, for closed-loop workloads, asks ``next_after(finish_s)``
each time a request completes. Everything is drawn from one seeded
``random.Random``: the same spec and seed give the same requests.

Arrivals: ``poisson`` (exponential gaps at ``rate``), ``gamma`` (gaps with
coefficient of variation ``cv``), ``closed`` (``concurrency`` requests in
flight, a new one when one finishes), ``trace`` (the trace's own timestamps
divided by ``time_scale``).
Lengths: ``fixed`` (``isl``/``osl``), or sampled with replacement from a named
distribution (``azure-conv``, ``azure-code``, ``mooncake``, ``sharegpt``).
Traces: ``azure-conv`` and ``azure-code`` (Patel et al., "Splitwise", ISCA
2024, CC-BY 4.0), ``mooncake`` (kvcache-ai/Mooncake, Apache-2.0; with prefix
hash ids naming 512-token blocks), ``sharegpt`` (lengths only, estimated from
text at run time; the data may not be committed).
"""

from __future__ import annotations

import csv
import gc
import gzip
import json
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

PACKAGE_DATA = Path(__file__).with_name("data")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ARRIVALS = ("poisson", "gamma", "closed", "trace")
TRACES = ("azure-conv", "azure-code", "mooncake", "sharegpt")
MOONCAKE_BLOCK_TOKENS = 512  # tokens named by one Mooncake hash id
_setattr = object.__setattr__  # past a frozen dataclass's own __setattr__


@dataclass(frozen=True)
class Request:
    """One simulated request."""

    index: int  # position in the workload, also the tie-breaker
    arrival_s: float  # when it reaches the controller
    prompt_tokens: int  # prompt length
    output_tokens: int  # tokens it will generate (max_tokens, EOS ignored)
    hash_ids: tuple[int, ...] = ()  # Mooncake prefix block ids (empty = no prefix sharing)

    def __init__(self, index: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
                 hash_ids: tuple[int, ...] = ()):
        # frozen: written once, here, as a whole new __dict__ (the generated __init__
        # costs 3x, 1M a run; see cluster.policies.types). ``request_id`` is no
        # field: ``r{index}``, read several times per request
        _setattr(self, "__dict__", {"index": index, "arrival_s": arrival_s,
                                    "prompt_tokens": prompt_tokens,
                                    "output_tokens": output_tokens, "hash_ids": hash_ids,
                                    "request_id": f"r{index}"})


@dataclass(frozen=True)
class WorkloadSpec:
    arrival: str = "poisson"  # poisson | gamma | closed | trace
    rate: float = 1.0  # requests/s (poisson, gamma)
    cv: float = 1.0  # coefficient of variation of gaps (gamma)
    concurrency: int = 1  # requests in flight (closed)
    num_requests: int = 100  # requests in all
    lengths: str = "fixed"  # fixed | a trace name to sample lengths from
    isl: int = 512  # prompt tokens (fixed lengths)
    osl: int = 128  # output tokens (fixed lengths)
    trace: str | None = None  # trace to replay (arrival == "trace")
    time_scale: float = 1.0  # trace speed-up: timestamps are divided by it
    max_prompt_tokens: int | None = None  # prompts longer than this are clipped
    max_output_tokens: int | None = None  # outputs longer than this are clipped
    max_total_tokens: int | None = None  # sampled lengths: skip rows whose prompt + output exceed it
    seed: int = 0  # RNG seed
    data_dir: Path = field(default=SHARED_DATA)  # where full traces live

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival {self.arrival!r} is unknown; allowed: {', '.join(ARRIVALS)}")
        if self.arrival == "trace" and self.trace not in TRACES:
            raise ValueError(f"trace {self.trace!r} is unknown; allowed: {', '.join(TRACES)}")
        if self.lengths != "fixed" and self.lengths not in TRACES:
            raise ValueError(f"lengths {self.lengths!r} is unknown; allowed: fixed, {', '.join(TRACES)}")
        for name in ("num_requests", "isl", "osl", "concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("rate", "cv", "time_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


@dataclass(frozen=True)
class TraceRow:
    offset_s: float  # seconds since the trace's first request
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


# ----- trace files -------------------------------------------------------------
def trace_path(name: str, data_dir: Path = SHARED_DATA) -> Path | None:
    """The full trace if ``data_dir`` has it, else the committed sample, else None."""
    full = {"azure-conv": "traces/AzureLLMInferenceTrace_conv.csv",
            "azure-code": "traces/AzureLLMInferenceTrace_code.csv",
            "mooncake": "traces/mooncake_conversation_trace.jsonl",
            "sharegpt": "prompts"}[name]
    if (data_dir / full).exists():
        return data_dir / full
    sample = {"azure-conv": "azure_conv_sample.csv", "azure-code": "azure_code_sample.csv",
              "mooncake": "mooncake_sample.jsonl"}.get(name)
    return PACKAGE_DATA / sample if sample and (PACKAGE_DATA / sample).exists() else None


def load_trace(name: str, data_dir: Path = SHARED_DATA) -> list[TraceRow]:
    path = trace_path(name, data_dir)
    if path is None:
        raise ValueError(f"trace {name!r} is not available: expected it under {data_dir} "
                         "(ShareGPT data is never committed; see ../shared/data/SOURCES.md)")
    if name.startswith("azure"):
        return _load_azure(path)
    if name == "mooncake":
        return _load_mooncake(path)
    return _load_sharegpt(path)


def _load_azure(path: Path) -> list[TraceRow]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
    t0 = stamps[0]
    return [TraceRow((t - t0).total_seconds(), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for t, r in zip(stamps, rows, strict=False)]


def _load_mooncake(path: Path) -> list[TraceRow]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [TraceRow(r["timestamp"] / 1000.0, int(r["input_length"]), int(r["output_length"]),
                     tuple(r["hash_ids"])) for r in rows]


def estimate_tokens(text: str) -> int:
    """Tokens of English text for a BPE tokenizer, estimated as bytes / 4
    (no tokenizer of the served models is available offline)."""
    return max(1, round(len(text.encode()) / 4))


def _load_sharegpt(folder: Path) -> list[TraceRow]:
    rows = []
    for part in sorted(folder.glob("sharegpt_v3_first_turn.part*.jsonl.gz")):
        with gzip.open(part, "rt") as fh:
            for line in fh:
                r = json.loads(line)
                rows.append(TraceRow(0.0, estimate_tokens(r["prompt"]),
                                     estimate_tokens(r["response"])))
    if not rows:
        raise ValueError(f"no ShareGPT files under {folder}")
    return rows


# ----- workloads ------------------------------------------------------------------
class Workload:
    """The requests of one run: all known up front, or released on completions."""

    def __init__(self, spec: WorkloadSpec, requests: list[Request], closed: bool):
        self.spec = spec
        self._requests = requests
        self.closed = closed
        self._next = spec.concurrency if closed else len(requests)

    def initial(self) -> list[Request]:
        return self._requests[:self._next] if self.closed else list(self._requests)

    def next_after(self, finish_s: float) -> Request | None:
        """Closed loop: the next request, arriving when one finishes."""
        if not self.closed or self._next >= len(self._requests):
            return None
        r = self._requests[self._next]
        self._next += 1
        return Request(r.index, finish_s, r.prompt_tokens, r.output_tokens, r.hash_ids)

    @property
    def num_requests(self) -> int:
        return len(self._requests)


def build_workload(spec: WorkloadSpec) -> Workload:
    rng = random.Random(spec.seed)
    if spec.arrival == "trace":
        rows = load_trace(spec.trace, spec.data_dir)[:spec.num_requests]
        if len(rows) < spec.num_requests:
            raise ValueError(f"trace {spec.trace!r} has {len(rows)} requests; "
                             f"num_requests={spec.num_requests}")
        times = [r.offset_s / spec.time_scale for r in rows]
    else:
        rows = _lengths(spec, rng)
        times = _arrival_times(spec, rng)
    max_prompt, max_output = spec.max_prompt_tokens, spec.max_output_tokens  # clipped to these
    hashed = spec.arrival == "trace"
    # the requests all live on: the cyclic collector would only walk the ones made
    # so far again and again while a million are made
    enabled = gc.isenabled()
    gc.disable()
    try:
        requests = [Request(i, t,
                            min(r.prompt_tokens, max_prompt) if max_prompt else r.prompt_tokens,
                            min(r.output_tokens, max_output) if max_output else r.output_tokens,
                            r.hash_ids if hashed else ())
                    for i, (t, r) in enumerate(zip(times, rows, strict=False))]
    finally:
        if enabled:
            gc.enable()
    return Workload(spec, requests, closed=spec.arrival == "closed")


def _lengths(spec: WorkloadSpec, rng: random.Random) -> list[TraceRow]:
    if spec.lengths == "fixed":
        return [TraceRow(0.0, spec.isl, spec.osl)] * spec.num_requests
    pool = load_trace(spec.lengths, spec.data_dir)
    if spec.max_total_tokens:
        pool = [r for r in pool if r.prompt_tokens + r.output_tokens <= spec.max_total_tokens]
    return [pool[int(rng.random() * len(pool))] for _ in range(spec.num_requests)]


def _arrival_times(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    n = spec.num_requests
    if spec.arrival == "closed":
        return [0.0] * n
    if spec.arrival == "poisson":
        gaps = [rng.expovariate(spec.rate) for _ in range(n)]
    else:  # gamma: shape k = 1/cv^2, mean 1/rate
        k = 1.0 / spec.cv ** 2
        gaps = [rng.gammavariate(k, 1.0 / (k * spec.rate)) for _ in range(n)]
    times, t = [], 0.0
    for g in gaps:
        times.append(t)
        t += g
    return times

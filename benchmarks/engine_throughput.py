"""Engine throughput: Baton's ``LLMEngine`` against Hugging Face transformers
``generate`` and vLLM's CPU build, on the same checkpoints and prompts.

What is measured, per model and batch size B (all B prompts submitted at
once, greedy, EOS ignored, fp32, ``--output-len`` N tokens each):

- prefill tok/s = prompt tokens / time to the first token of the whole batch
  (a run with ``max_tokens=1``);
- decode tok/s = B * (N - 1) / (time of the N-token run - that prefill time).

Each engine runs in its own subprocess (``benchmarks/peers/*_peer.py``), one
after the other, so only one engine uses the cores at a time; each peer loads
its engine once, then per batch does one warm-up and ``--reps`` timed
repetitions (see ``benchmarks/peers/common.py``). With ``--rounds R`` the
engines take turns R times and the medians pool every round's repetitions.

Prompts are token ids, drawn once with a fixed seed: lengths uniform in
16..256 (tiny) or 32..512 (llama-60m), ids uniform over the 256 byte tokens;
batch B takes the first B prompts of the same list, for every engine.
Checkpoints are written once by ``python -m workers.checkpoint`` to
``benchmarks/out/models/<name>`` (a Hugging Face directory all three read).

Greedy agreement: every engine's N tokens are compared with HF's (or with
Baton's when HF is not run): sequences whose first 8 tokens match, whose N
tokens all match, and the mean common-prefix length. Random-weight models
have close logits; fp32 rounding differences (padding, fused matmuls) can
flip a near-tie, after which a sequence diverges: reported, not failed.

Threads: Baton and HF run with the same intra-op thread count, ``--threads``
(default: torch's default, all cores); the table names it per row ("bind=..."
for vLLM, whose OpenMP binding is its own).

Usage::

    python benchmarks/engine_throughput.py                       # everything
    python benchmarks/engine_throughput.py --models tiny --batches 1,8 --peers hf
    python benchmarks/engine_throughput.py --peers hf,vllm,vllm@0-1 --json out.json
    python benchmarks/engine_throughput.py --device cuda --peers hf   # on a GPU

Baton runs with ``EngineConfig.cpu_kernels`` (the C++ CPU kernels of
``kernels/cpu_kernels.py``: paged decode attention, RMSNorm; compiled once
per machine when the peer loads, never timed) unless ``--baton-cpu-kernels
off``; the peer ``baton-torch`` adds a row for Baton without them (torch
only: decode buffer + SDPA).

Peers: ``hf`` (transformers, in this venv), ``vllm`` (``.bench-venv-vllm``,
made by ``benchmarks/setup_vllm_cpu.sh``; vLLM's own CPU binding, which on 2
cores gives the model ONE thread and reserves the other for its scheduler),
``vllm@<cpus>`` (same, with ``VLLM_CPU_OMP_THREADS_BIND=<cpus>``, e.g.
``vllm@0-1`` for all cores). Baton always runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import machine

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(__file__).resolve().parent / "peers"
OUT_DIR = ROOT / "benchmarks" / "out"
PREFIX = "@@BENCH "

PROMPT_LENS = {"tiny": (16, 256), "llama-60m": (32, 512)}
DEFAULT_PROMPT_LENS = (32, 512)
PAD_TOKEN_ID = 258  # <pad> of the byte tokenizer the presets are saved with
AGREE_FIRST = 8
TARGETS = {1: 1.0, 32: 1.5}  # batch -> minimum Baton/HF ratio (from the issue)
# Baton rows -> EngineConfig.cpu_kernels (None: --baton-cpu-kernels decides)
BATON_VARIANTS = {"baton": None, "baton-torch": False}


# ----- inputs --------------------------------------------------------------
def ensure_model(name: str, cache: Path) -> Path:
    """The preset written once as a Hugging Face directory under ``cache``."""
    out = cache / name
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    subprocess.run([sys.executable, "-m", "workers.checkpoint", name, str(out)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def make_prompts(model: str, n: int, seed: int, lens: tuple[int, int]) -> list[list[int]]:
    rng = random.Random(f"engine-throughput:{model}:{seed}")
    lo, hi = lens
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# ----- peers ---------------------------------------------------------------
def peer_command(engine: str, args) -> list[str] | None:
    if engine in BATON_VARIANTS:
        return [sys.executable, str(PEERS_DIR / "baton_peer.py")]
    if engine == "hf":
        return [sys.executable, str(PEERS_DIR / "hf_peer.py")]
    if engine.startswith("vllm"):
        py = Path(args.vllm_python)
        return [str(py), str(PEERS_DIR / "vllm_peer.py")] if py.exists() else None
    raise ValueError(f"unknown engine {engine!r}: expected hf, vllm, vllm@<cpus> or baton-torch")


def peer_spec(engine: str, model_dir: Path, prompts: list[list[int]], args) -> dict:
    spec = {
        "model_dir": str(model_dir), "dtype": args.dtype, "output_len": args.output_len,
        "reps": args.reps, "warmup": args.warmup, "pad_token_id": PAD_TOKEN_ID,
        "threads": args.threads, "device": args.device,
        "cases": [{"prompts": prompts[:b]} for b in args.batches],
        "baton": {"max_num_batched_tokens": args.baton_max_batched_tokens,
                  "prefill_chunk_size": args.baton_prefill_chunk,
                  "cpu_kernels": args.baton_cpu_kernels == "on"
                  if BATON_VARIANTS.get(engine) is None else BATON_VARIANTS[engine]},
        "vllm": {"kvcache_space_gib": args.vllm_kvcache_gib},
    }
    if "@" in engine:
        spec["vllm"]["omp_threads_bind"] = engine.split("@", 1)[1]
    return spec


class ForeignLoad:
    """Samples /proc every ``period`` s and adds up the CPU time of processes
    that are not this benchmark or its descendants (other people's tests on a
    shared machine): ``cores()`` = their average number of busy cores."""

    def __init__(self, period: float = 0.5):
        self.period = period
        self.busy_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = self._t1 = time.monotonic()

    @staticmethod
    def _snapshot() -> dict[int, tuple[int, float]]:
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[1] = ppid, fields[11:13] = utime, stime (after the name)
            out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        return out

    def _loop(self) -> None:
        me = os.getpid()
        prev = self._snapshot()
        while not self._stop.wait(self.period):
            cur = self._snapshot()
            ours = {me}
            changed = True
            while changed:  # descendants of this process
                changed = False
                for pid, (ppid, _) in cur.items():
                    if ppid in ours and pid not in ours:
                        ours.add(pid)
                        changed = True
            for pid, (_, cpu) in cur.items():
                if pid not in ours and pid in prev:
                    self.busy_s += max(0.0, cpu - prev[pid][1])
            prev = cur
            self._t1 = time.monotonic()

    def __enter__(self) -> ForeignLoad:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def cores(self) -> float | None:
        span = self._t1 - self._t0
        return self.busy_s / span if span > 0 else None


def wait_for_quiet(limit_s: float, threshold: float = 0.3, window_s: float = 3.0) -> float | None:
    """Wait (at most ``limit_s``) until other processes use < ``threshold``
    cores over a ``window_s`` window; the last window's reading."""
    deadline = time.monotonic() + limit_s
    reading = None
    while True:
        with ForeignLoad(period=0.5) as fl:
            time.sleep(window_s)
        reading = fl.cores()
        if reading is None or reading < threshold or time.monotonic() > deadline:
            return reading


def run_peer(engine: str, cmd: list[str], spec: dict, log_path: Path, bar, timeout: float) -> dict:
    """Run one peer to completion; its results, load info and errors."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    info: dict = {"engine": engine, "results": [], "error": None, "log": str(log_path)}
    t0, load0 = time.time(), os.getloadavg()[0]
    foreign = ForeignLoad().__enter__()
    deadline = time.monotonic() + timeout
    try:
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd + [spec_path]) + "\n")
            proc = subprocess.Popen(cmd + [spec_path], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for line in proc.stdout:
                log.write(line)
                if time.monotonic() > deadline:
                    proc.kill()
                    info["error"] = f"timed out after {timeout:.0f}s"
                    break
                if not line.startswith(PREFIX):
                    continue
                ev = json.loads(line[len(PREFIX):])
                if ev["event"] == "loaded":
                    info["load_s"], info["versions"] = ev["load_s"], ev.get("versions", {})
                    info["threads"] = ev.get("threads")
                    bar.update(1)
                elif ev["event"] == "progress":
                    bar.update(1)
                elif ev["event"] == "result":
                    info["results"].append(ev)
                    bar.set_postfix_str(f"{engine} b={ev['batch']} done")
            rc = proc.wait()
    finally:
        foreign.__exit__(None, None, None)
        os.unlink(spec_path)
    info["wall_s"] = time.time() - t0
    info["loadavg_1m"] = [load0, os.getloadavg()[0]]
    info["foreign_cores"] = foreign.cores()  # other people's processes, average busy cores
    if rc != 0 and not info["error"]:
        tail = log_path.read_text().splitlines()[-15:]
        info["error"] = f"exit code {rc}; last log lines:\n" + "\n".join(tail)
    elif len(info["results"]) != len(spec["cases"]) and not info["error"]:
        info["error"] = f"{len(info['results'])} of {len(spec['cases'])} batches reported"
    return info


# ----- analysis ------------------------------------------------------------
def merge_rounds(infos: list[dict]) -> dict:
    """One engine's rounds as one peer: per batch, the medians over every
    timed repetition of every round (tokens from the last round)."""
    merged = dict(infos[-1], results=[])
    for result in infos[-1]["results"]:
        same = [r for info in infos for r in info["results"] if r["batch"] == result["batch"]]
        prefill_all = [x for r in same for x in r["prefill_s_all"]]
        total_all = [x for r in same for x in r["total_s_all"]]
        p, t = statistics.median(prefill_all), statistics.median(total_all)
        decode_tokens = result["batch"] * (result["output_len"] - 1)
        merged["results"].append(dict(
            result, prefill_s=p, total_s=t, prefill_s_all=prefill_all, total_s_all=total_all,
            prefill_tok_s=result["prompt_tokens"] / p,
            decode_tok_s=decode_tokens / (t - p) if t > p and decode_tokens else None))
    return merged


def agreement(tokens: list[list[int]], ref: list[list[int]], first: int) -> dict:
    def prefix(a, b):
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n
    prefixes = [prefix(a, b) for a, b in zip(tokens, ref, strict=True)]
    k = min(first, min((len(r) for r in ref), default=0))
    return {
        "seqs": len(ref),
        "first_k": k,
        "first_k_match": sum(p >= k for p in prefixes),
        "all_match": sum(a == b for a, b in zip(tokens, ref, strict=True)),
        "mean_common_prefix": statistics.fmean(prefixes) if prefixes else 0.0,
    }


def build_rows(model: str, peers: list[dict]) -> list[dict]:
    by_engine = {p["engine"]: {r["batch"]: r for r in p["results"]} for p in peers}
    threads = {p["engine"]: p.get("threads") for p in peers}
    ref_engine = "hf" if by_engine.get("hf") else "baton"
    rows = []
    batches = sorted({b for res in by_engine.values() for b in res})
    for b in batches:
        ref = by_engine.get(ref_engine, {}).get(b)
        hf = by_engine.get("hf", {}).get(b)
        for engine, res in by_engine.items():
            r = res.get(b)
            if r is None:
                continue
            row = {k: r[k] for k in ("batch", "prompt_tokens", "output_len", "prefill_s",
                                     "total_s", "prefill_tok_s", "decode_tok_s",
                                     "prefill_s_all", "total_s_all")}
            row.update(model=model, engine=engine, prefill_x_hf=None, decode_x_hf=None,
                       agreement=None, agreement_ref=ref_engine, threads=threads.get(engine))
            if hf is not None:
                row["prefill_x_hf"] = r["prefill_tok_s"] / hf["prefill_tok_s"]
                if r["decode_tok_s"] and hf["decode_tok_s"]:
                    row["decode_x_hf"] = r["decode_tok_s"] / hf["decode_tok_s"]
            if ref is not None and engine != ref_engine:
                row["agreement"] = agreement(r["token_ids"], ref["token_ids"], AGREE_FIRST)
            rows.append(row)
    return rows


def _f(x, fmt="{:,.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    a = report["args"]
    ref = "HF"
    ranges = ", ".join("{}: {}..{}".format(m, *PROMPT_LENS.get(m, DEFAULT_PROMPT_LENS))
                       for m in a["models"])
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}. Started {report['started']}; "
        f"wall {report['wall_s'] / 60:.1f} min.",
        f"Workload: prompts as token ids, lengths uniform per model ({ranges}), "
        f"seed {a['seed']}; {a['output_len']} output tokens, greedy, EOS ignored, {a['dtype']}; "
        f"baton's C++ CPU kernels {a.get('baton_cpu_kernels', 'off')}; "
        f"1 warm-up + median of {a['reps']} per peer process, "
        f"{a.get('rounds', 1)} alternating round(s) pooled.",
        "",
        "| model | batch | prompt tok | engine | threads | prefill tok/s | decode tok/s "
        f"| prefill ×{ref} | decode ×{ref} | greedy vs {ref}: first {AGREE_FIRST} / all |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        ag = r["agreement"]
        agree = "(reference)" if r["engine"] == r["agreement_ref"] else (
            "—" if ag is None else
            f"{ag['first_k_match']}/{ag['seqs']} / {ag['all_match']}/{ag['seqs']}"
            f" (prefix {ag['mean_common_prefix']:.1f})")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt_tokens']:,} | {r['engine']} "
            f"| {r.get('threads') or '—'} | {_f(r['prefill_tok_s'])} | {_f(r['decode_tok_s'])} "
            f"| {_f(r['prefill_x_hf'], '{:.2f}x')} | {_f(r['decode_x_hf'], '{:.2f}x')} | {agree} |")
    lines.append("")
    lines += targets_lines(report["rows"])
    lines.append("")
    lines.append("Conditions (per peer process: 1-min load average at start/end; cores kept busy "
                 "by other processes on average while it ran):")
    for p in report["peers"]:
        fc = p.get("foreign_cores")
        err = f" — FAILED: {p['error'].splitlines()[0]}" if p.get("error") else ""
        lines.append(
            f"- {p['model']}/{p['engine']} (round {p.get('round', 1)}, threads "
            f"{p.get('threads') or '—'}): load {p['loadavg_1m'][0]:.2f}→{p['loadavg_1m'][1]:.2f}, "
            f"other processes {_f(fc, '{:.2f}')} cores, wall {p['wall_s']:.0f}s"
            f"{', versions ' + json.dumps(p['versions']) if p.get('versions') else ''}{err}")
    for s in report.get("skipped", []):
        lines.append(f"- skipped: {s}")
    return "\n".join(lines)


def targets_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["engine"] != "baton" or r["batch"] not in TARGETS or r["prefill_x_hf"] is None:
            continue
        goal = TARGETS[r["batch"]]
        parts = []
        for what in ("prefill", "decode"):
            x = r[f"{what}_x_hf"]
            parts.append(f"{what} {_f(x, '{:.2f}x')} {'met' if x is not None and x >= goal else 'MISSED'}")
        out.append(f"- Target {r['model']} batch {r['batch']} (Baton ≥ {goal:.1f}x HF): "
                   + ", ".join(parts))
    return (["Targets (from the issue):"] + out) if out else []


# ----- main ----------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--models", type=csv, default=["tiny", "llama-60m"])
    p.add_argument("--batches", type=lambda s: [int(x) for x in csv(s)], default=[1, 8, 32])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--peers", type=csv, default=["hf", "vllm"],
                   help="engines besides Baton: hf, vllm, vllm@<cpus> (e.g. vllm@0-1)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median kept)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine this many times, alternating (baton, hf, ..., baton, "
                        "hf, ...), and keep the medians over all rounds: spreads the noise of a "
                        "shared machine evenly over the engines")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda: Baton (Triton decode attention) and HF on the GPU; "
                        "vLLM's CPU build is skipped there")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for Baton and HF alike (default: torch's, i.e. all "
                        "cores); vLLM keeps its own OpenMP binding")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the markdown report here")
    p.add_argument("--model-cache", type=Path, default=OUT_DIR / "models")
    p.add_argument("--log-dir", type=Path, default=OUT_DIR / "logs")
    p.add_argument("--vllm-python", default=str(ROOT / ".bench-venv-vllm" / "bin" / "python"))
    p.add_argument("--vllm-kvcache-gib", type=int, default=2)
    p.add_argument("--baton-max-batched-tokens", type=int, default=None,
                   help="Baton's token budget per step (default 4096 on CPU; 16384 on CUDA, "
                        "where a whole batch of prompts fits one step, as HF's one forward)")
    p.add_argument("--baton-prefill-chunk", type=int, default=512)
    p.add_argument("--baton-cpu-kernels", choices=["on", "off"], default="on",
                   help="the 'baton' row's EngineConfig.cpu_kernels: the C++ kernels of "
                        "kernels/cpu_kernels.py (built on first use, before any timing); "
                        "the peer 'baton-torch' always runs without them")
    p.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                   help="before each peer, wait up to S seconds until other processes use "
                        "< 0.3 cores (shared machines)")
    p.add_argument("--peer-timeout", type=float, default=3600, help="seconds per peer process")
    args = p.parse_args(argv)
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (decode is measured after the first token)")
    if args.reps < 1 or args.rounds < 1:
        p.error("--reps and --rounds must be >= 1")
    if args.baton_max_batched_tokens is None:
        args.baton_max_batched_tokens = 16384 if args.device.startswith("cuda") else 4096
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv=None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    engines = ["baton"] + [e for e in args.peers if e != "baton"]
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.time()
    report = {"command": "python benchmarks/engine_throughput.py "
                         + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine(args.device), "started": started, "args": {
                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": [], "peers": [], "skipped": []}
    runnable = []
    for engine in engines:
        cmd = peer_command(engine, args)
        if cmd is None:
            report["skipped"].append(
                f"{engine}: {args.vllm_python} not found (run bash benchmarks/setup_vllm_cpu.sh)")
        else:
            runnable.append((engine, cmd))
    total = len(args.models) * len(runnable) * args.rounds * (1 + len(args.batches) * args.reps)
    with tqdm(total=total, desc="engine throughput", unit="step", file=sys.stderr) as bar:
        for model in args.models:
            model_dir = ensure_model(model, args.model_cache)
            lens = PROMPT_LENS.get(model, DEFAULT_PROMPT_LENS)
            prompts = make_prompts(model, max(args.batches), args.seed, lens)
            rounds: dict[str, list[dict]] = {engine: [] for engine, _ in runnable}
            for r in range(args.rounds):
                for engine, cmd in runnable:
                    if args.quiet_wait > 0:
                        bar.set_description(f"{model}/{engine} (waiting for a quiet machine)")
                        wait_for_quiet(args.quiet_wait)
                    bar.set_description(f"{model}/{engine} round {r + 1}/{args.rounds}")
                    spec = peer_spec(engine, model_dir, prompts, args)
                    log = args.log_dir / f"{model}-{engine.replace('@', '_')}.log"
                    info = run_peer(engine, cmd, spec, log, bar, args.peer_timeout)
                    info.update(model=model, round=r + 1)
                    if info["error"]:
                        tqdm.write(f"[{model}/{engine}] FAILED: {info['error']}", file=sys.stderr)
                    rounds[engine].append(info)
            report["peers"] += [{k: v for k, v in p.items() if k != "results"}
                                for infos in rounds.values() for p in infos]
            peers = [merge_rounds(infos) for infos in rounds.values()]
            report["rows"] += build_rows(model, peers)
            report.setdefault("token_ids", {})[model] = {
                p["engine"]: {r["batch"]: r["token_ids"] for r in p["results"]} for p in peers}
    report["wall_s"] = time.time() - t0
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

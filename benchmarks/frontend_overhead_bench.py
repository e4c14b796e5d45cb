"""Streaming overhead of the frontends: p50 inter-token latency seen by a
client through gRPC and through HTTP (SSE), against the in-process engine's
own token-to-token time for the same requests (target: at most 1 ms added).

The engine and both frontends run in this process (``cluster.engine_backend``);
the load comes from ``baton bench`` in a separate process, so client-side
parsing does not share this interpreter.

    python benchmarks/frontend_overhead_bench.py [--num-prompts 24] [--concurrency 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import emit_report  # noqa: E402
from cluster.engine_backend import EngineBackend  # noqa: E402
from cluster.grpc_server import GrpcFrontend  # noqa: E402
from cluster.http_server import HttpFrontend  # noqa: E402
from cluster.validation import ModelLimits  # noqa: E402
from workers.engine import EngineConfig, LLMEngine  # noqa: E402


async def _bench(args, backend: str, address: str, concurrency: int) -> dict:
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "--backend", backend,
           "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--range-ratio", "0",
           "--concurrency", str(concurrency), "--json", "--seed", str(concurrency)]
    cmd += ["--address", address] if backend == "grpc" else ["--url", address]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out)


def _engine_itl_ms(backend: EngineBackend, before: set[str]) -> list[float]:
    gaps = []
    for rid in [r for r in backend._requests if r not in before]:
        times = backend.token_times(rid)
        gaps += [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    return gaps


async def main_async(args) -> list[dict]:
    engine = LLMEngine(EngineConfig(model="tiny", num_threads=args.threads))
    backend = EngineBackend(engine)
    backend.attach()
    limits = ModelLimits("tiny", engine.max_model_len, engine.model_config.vocab_size)
    grpc_fe = GrpcFrontend(backend, limits, engine.tokenizer)
    http_fe = HttpFrontend(backend, limits, engine.tokenizer)
    addresses = {"grpc": f"127.0.0.1:{await grpc_fe.start('127.0.0.1', 0)}",
                 "http": f"http://127.0.0.1:{await http_fe.start('127.0.0.1', 0)}"}
    rows = []
    try:
        for concurrency in args.concurrency:
            for frontend in args.frontends:
                seen = set(backend._requests)
                report = await _bench(args, frontend, addresses[frontend], concurrency)
                engine_itl = _engine_itl_ms(backend, seen)
                client_p50 = report["itl_ms"]["p50"]
                engine_p50 = statistics.median(engine_itl)
                rows.append({"frontend": frontend, "concurrency": concurrency,
                             "client_itl_p50_ms": client_p50, "engine_itl_p50_ms": engine_p50,
                             "added_ms": client_p50 - engine_p50,
                             "client_tpot_p50_ms": report["tpot_ms"]["p50"],
                             "failed": report["failed"]})
    finally:
        await grpc_fe.stop(1.0)
        await http_fe.stop(1.0)
        backend.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8])
    p.add_argument("--frontends", type=lambda s: s.split(","), default=["grpc", "http"])
    p.add_argument("--threads", type=int, default=1, help="engine torch threads")
    p.add_argument("--json", default=None, help="'-' prints JSON; FILE writes it too")
    args = p.parse_args()
    rows = asyncio.run(main_async(args))
    emit_report({"rows": rows, "settings": vars(args)}, args.json, _print_table)


def _print_table(report: dict) -> None:
    print("| frontend | concurrency | engine ITL p50 | client ITL p50 | added | client TPOT p50 "
          "| failed |\n|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['frontend']} | {r['concurrency']} | {r['engine_itl_p50_ms']:.2f} ms | "
              f"{r['client_itl_p50_ms']:.2f} ms | {r['added_ms']:+.2f} ms | "
              f"{r['client_tpot_p50_ms']:.2f} ms | {r['failed']} |")


if __name__ == "__main__":
    main()

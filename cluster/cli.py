"""The ``baton`` command line.

Lifecycle: ``main`` parses the sub-command and hands off to the module that
implements it; every sub-command validates its flags before doing any work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.engine_only:
        from cluster.engine_demo import print_report, run_engine_demo

        report = run_engine_demo(args.model, args.num_requests, args.max_tokens,
                                 stream=not args.json)
        print_report(report, args.json)
        return 0
    from cluster.demo import run_demo

    reports = run_demo(args.num_requests, as_json=args.json)
    return 0 if all(r.matches_reference == len(r.requests) for r in reports) else 1


def _cmd_generate(args: argparse.Namespace) -> int:
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                "seed": args.seed, "ignore_eos": args.ignore_eos or None}
    try:
        result = (_generate_in_process(args.prompt, args.model, sampling, args.stream
                                       and not args.json) if args.engine_only
                  else _generate_remote(args, sampling))
    except ValueError as exc:
        print(f"baton generate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif not args.stream:
        print(result["text"])
    else:
        print()
    return 0


def _generate_in_process(prompt: str, model: str, sampling: dict, stream: bool) -> dict:
    from workers.engine import EngineConfig, LLMEngine
    from workers.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=model))
    engine.add_request("cli-0", prompt, SamplingParams(
        **{k: v for k, v in sampling.items() if v is not None}))
    token_ids, text, reason = [], [], None
    for out in engine.stream():
        token_ids += out.new_token_ids
        text.append(out.new_text)
        if stream:
            print(out.new_text, end="", flush=True)
        reason = out.finish_reason
    return {"text": "".join(text), "token_ids": token_ids,
            "finish_reason": reason.value if reason else None}


def _generate_remote(args: argparse.Namespace, sampling: dict) -> dict:
    import grpc

    from cluster.client import BatonClient, Completion

    token = os.environ.get(args.token_env) if args.token_env else None
    with BatonClient(args.address, token=token) as client:
        try:
            for item in client.stream(args.prompt, stream=True, **sampling):
                if isinstance(item, Completion):
                    return {"text": item.text, "token_ids": item.token_ids,
                            "finish_reason": item.finish_reason, "usage": {
                                "prompt_tokens": item.prompt_tokens,
                                "completion_tokens": item.completion_tokens},
                            "timing": item.timing}
                if args.stream and not args.json:
                    print(item.text, end="", flush=True)
        except grpc.RpcError as exc:
            raise ValueError(f"{exc.code().name}: {exc.details()}") from None
    raise ValueError("the stream ended without a final message")


def _cmd_serve(args: argparse.Namespace) -> int:
    from cluster.serve import serve

    return serve(args.config, args.grpc_port, args.ray_address, http_port=args.http_port)


def _cmd_bench(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from tqdm import tqdm

    from cluster.bench import Target, parse_slo, render, report_json, run_load, summarise
    from cluster.bench_data import DatasetSpec, arrival_offsets, load_requests

    try:
        slo = parse_slo(args.slo)
        tokenizer = None
        if args.tokenizer:
            from workers.loader import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        requests = load_requests(DatasetSpec(
            args.dataset, args.num_prompts, args.seed,
            Path(args.dataset_path) if args.dataset_path else None, args.input_len,
            args.output_len, args.range_ratio, args.max_input_tokens, args.max_output_tokens,
            args.vocab_size, tokenizer))
        offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
    except ValueError as exc:
        print(f"baton bench: {exc}", file=sys.stderr)
        return 2
    token = os.environ.get(args.token_env) if args.token_env else None
    target = Target(args.backend, args.url if args.backend == "http" else args.address,
                    args.endpoint, args.model, token)
    with tqdm(total=len(requests), disable=args.json, desc="requests") as bar:
        outcomes, duration = asyncio.run(run_load(target, requests, offsets, args.concurrency,
                                                  bar))
    report = summarise(outcomes, duration, slo)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    print(report_json(report, settings) if args.json else render(report))
    return 0 if report["failed"] == 0 else 1


def _cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from cluster.client import BatonClient

    token = os.environ.get(args.token_env) if args.token_env else None
    with BatonClient(args.address, token=token) as client:
        try:
            s = client.status()
        except grpc.RpcError as exc:
            print(f"baton status: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    workers = [{"worker_id": w.worker_id, "role": w.role, "gpu_type": w.gpu_type,
                "device": w.device, "alive": w.alive, "running": w.running,
                "kv_used": 1 - w.free_kv_blocks / max(w.total_kv_blocks, 1)} for w in s.workers]
    if args.json:
        print(json.dumps({"cluster": s.cluster, "draining": s.draining, "waiting": s.waiting,
                          "running": s.running, "workers": workers}, indent=1))
        return 0
    print(f"cluster {s.cluster}: {s.waiting} waiting, {s.running} running"
          + (" (draining)" if s.draining else ""))
    print(f"{'worker':<32} {'role':<8} {'gpu':<8} {'alive':<6} {'running':>7} {'KV used':>8}")
    for w in workers:
        print(f"{w['worker_id']:<32} {w['role']:<8} {w['gpu_type']:<8} {str(w['alive']):<6} "
              f"{w['running']:>7} {w['kv_used']:>7.1%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Baton LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="disaggregated tiny cluster on local Ray + Redis")
    demo.add_argument("--engine-only", action="store_true",
                      help="only the in-process engine (no Ray, no Redis)")
    demo.add_argument("--model", default="tiny", help="--engine-only: model preset or path")
    demo.add_argument("--num-requests", type=_positive, default=64)
    demo.add_argument("--max-tokens", type=_positive, default=48,
                      help="--engine-only: tokens per request")
    demo.add_argument("--json", action="store_true", help="print a JSON report")
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--engine-only", action="store_true",
                     help="run in the in-process engine (the reference)")
    gen.add_argument("--address", default="127.0.0.1:50051", help="gRPC HOST:PORT")
    gen.add_argument("--token-env", default="BATON_API_TOKEN",
                     help="environment variable holding the bearer token")
    gen.add_argument("--model", default="tiny", help="--engine-only: preset or HF directory")
    gen.add_argument("--max-tokens", type=_positive, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stream", action="store_true")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="run a cluster, its gRPC and HTTP APIs until SIGTERM")
    srv.add_argument("--config", default=None,
                     help="cluster YAML or example name (default: tiny-disagg)")
    srv.add_argument("--grpc-port", type=int, default=None, help="default: server.grpc_port")
    srv.add_argument("--http-port", type=int, default=None, help="default: server.http_port")
    srv.add_argument("--ray-address", default=None, help="join this Ray cluster")
    srv.set_defaults(func=_cmd_serve)

    st = sub.add_parser("status", help="pools, workers, GPU types, KV usage, queues")
    st.add_argument("--address", default="127.0.0.1:50051")
    st.add_argument("--token-env", default="BATON_API_TOKEN")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    _add_bench(sub)
    _add_sim(sub)
    from cluster.ranker.cli import add_ranker_commands
    add_ranker_commands(sub)
    return parser


def _add_bench(sub) -> None:
    from cluster.bench_data import DATASETS

    b = sub.add_parser("bench", help="load generator against the gRPC or HTTP endpoint")
    b.add_argument("--backend", choices=("grpc", "http"), default="grpc")
    b.add_argument("--address", default="127.0.0.1:50051", help="gRPC HOST:PORT")
    b.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    b.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="HTTP: /v1/completions or /v1/chat/completions")
    b.add_argument("--model", default="", help="model name sent (default: the served one)")
    b.add_argument("--token-env", default="BATON_API_TOKEN",
                   help="environment variable holding the bearer token")
    b.add_argument("--dataset", choices=DATASETS, default="random")
    b.add_argument("--dataset-path", default=None,
                   help="ShareGPT .jsonl(.gz) file or folder, or a trace file")
    b.add_argument("--tokenizer", default=None,
                   help="count ShareGPT tokens with this model's tokenizer (default: bytes/4)")
    b.add_argument("--num-prompts", type=_positive, default=100)
    b.add_argument("--input-len", type=_positive, default=128, help="random: prompt tokens")
    b.add_argument("--output-len", type=_positive, default=64, help="random: output tokens")
    b.add_argument("--range-ratio", type=float, default=0.5, help="random: length spread")
    b.add_argument("--max-input-tokens", type=_positive, default=None)
    b.add_argument("--max-output-tokens", type=_positive, default=None)
    b.add_argument("--vocab-size", type=_positive, default=256,
                   help="synthetic prompts draw token ids below this")
    b.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s (default inf: all at once)")
    b.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps (1 = Poisson)")
    b.add_argument("--concurrency", type=_positive, default=None,
                   help="at most this many requests in flight")
    b.add_argument("--slo", nargs="*", default=[], metavar="NAME:MS",
                   help="e.g. ttft:500 tpot:50 (goodput counts requests meeting all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=_cmd_bench)


def _add_sim(sub) -> None:
    from sim.cli import add_sim_commands

    add_sim_commands(sub)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

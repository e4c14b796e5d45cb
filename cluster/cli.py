"""The ``baton`` command line.

Lifecycle: ``main`` parses the sub-command and hands off to the module that
implements it; every sub-command validates its flags before doing any work.
"""

from __future__ import annotations

import argparse
import json
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
    from workers.engine import EngineConfig, LLMEngine
    from workers.sampling import SamplingParams

    if not args.engine_only:
        print("baton generate: only --engine-only is available in this build", file=sys.stderr)
        return 2
    engine = LLMEngine(EngineConfig(model=args.model))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed, ignore_eos=args.ignore_eos)
    try:
        engine.add_request("cli-0", args.prompt, params)
    except ValueError as exc:
        print(f"baton generate: {exc}", file=sys.stderr)
        return 2
    token_ids, text, reason = [], [], None
    for out in engine.stream():
        token_ids += out.new_token_ids
        text.append(out.new_text)
        if args.stream and not args.json:
            print(out.new_text, end="", flush=True)
        reason = out.finish_reason
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": token_ids,
                          "finish_reason": reason.value if reason else None}))
    elif not args.stream:
        print("".join(text))
    else:
        print()
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
    gen.add_argument("--model", default="tiny")
    gen.add_argument("--max-tokens", type=_positive, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stream", action="store_true")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=_cmd_generate)
    return parser


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

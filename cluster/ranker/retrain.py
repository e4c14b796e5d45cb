"""Fine-tuning the serving head on the completion log (``--from-redis``).

Lifecycle: ``finetune_from_log`` reads every logged completion of a cluster
(traffic.py), turns it into head features (stored features as they are;
redacted prompts through the backbone), splits by the record id (the prompt
hash) into train and validation, continues the current head with ListMLE
(train.py ``finetune``), and writes the result to ``out_dir/head.safetensors``
with a report. The caller hot-swaps it into the controller.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cluster.ranker.data import split_of
from cluster.ranker.head import ScoreHead
from cluster.ranker.traffic import Completion, read_completions
from cluster.ranker.train import Features, TrainConfig, finetune

MIN_COMPLETIONS = 64  # fewer than this cannot tell a better head from a worse one


def completion_features(rows: list[Completion], head_path: Path) -> torch.Tensor:
    """(N, 385): stored features, or the backbone's on redacted prompts."""
    missing = [i for i, c in enumerate(rows) if c.features is None]
    out = torch.zeros(len(rows), 385)
    for i, c in enumerate(rows):
        if c.features is not None:
            out[i] = c.features
    if missing:
        from cluster.ranker.ranker import Ranker

        out[missing] = Ranker.load(head_path).features([rows[i].prompt or "" for i in missing])
    return out


def to_features(rows: list[Completion], x: torch.Tensor) -> Features:
    return Features(x, torch.tensor([c.output_tokens for c in rows]),
                    torch.expm1(x[:, -1]).round().long())


def finetune_from_log(url: str, namespace: str, password: str | None, init: Path,
                      out_dir: Path, cfg: TrainConfig) -> dict:
    rows = read_completions(url, namespace, password)
    if len(rows) < MIN_COMPLETIONS:
        raise ValueError(f"{namespace}: {len(rows)} logged completions; at least "
                         f"{MIN_COMPLETIONS} are needed (is ranker.log_completions on?)")
    x = completion_features(rows, init)
    is_val = [split_of(c.id) == "val" for c in rows]
    tr = [i for i, v in enumerate(is_val) if not v]
    va = [i for i, v in enumerate(is_val) if v] or tr
    head = ScoreHead.load(init)
    new, report = finetune(head, to_features([rows[i] for i in tr], x[tr]),
                           to_features([rows[i] for i in va], x[va]), cfg)
    new = new.clone()
    new.meta = {**head.meta, "source": f"finetuned on {len(rows)} completions of {namespace}",
                "finetune": {k: v for k, v in report.items() if k != "history"}}
    out_dir = Path(out_dir)
    new.save(out_dir / "head.safetensors")
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report

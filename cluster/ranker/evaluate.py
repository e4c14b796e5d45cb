"""How well scores order prompts by true output length.

Lifecycle: pure functions over two equal-length sequences, called after
training (test split), by ``baton ranker eval`` and by the online gauge.
A score ranks a prompt earlier when it is higher, so a perfect ranker has
scores in the reverse order of the lengths.

- Kendall's tau: ``scipy.stats.kendalltau`` (tau-b, ties in either sequence
  handled) between ``-score`` and the length: 1 = the shortest-job-first
  order exactly, 0 = unrelated.
- Pairwise accuracy: over the pairs whose lengths differ, the fraction the
  scores put in the right order (a score tie counts one half).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RankQuality:
    kendall_tau: float  # tau-b between -score and the true length
    pairwise_accuracy: float  # correctly ordered pairs / pairs of different lengths
    n: int  # prompts evaluated

    def to_json(self) -> dict:
        return asdict(self)


def kendall_tau(scores, lengths) -> float:
    from scipy.stats import kendalltau

    s, y = _arrays(scores, lengths)
    if len(s) < 2:
        return float("nan")
    return float(kendalltau(-s, y).statistic)


def pairwise_accuracy(scores, lengths, chunk: int = 2048) -> float:
    s, y = _arrays(scores, lengths)
    right = pairs = 0.0
    for a in range(0, len(s), chunk):
        ds = s[a:a + chunk, None] - s[None, :]  # (c, n) score differences
        dy = y[a:a + chunk, None] - y[None, :]  # (c, n) length differences
        counted = dy != 0
        pairs += counted.sum()
        right += ((np.sign(ds) == -np.sign(dy)) & counted).sum() + 0.5 * ((ds == 0) & counted).sum()
    return float(right / pairs) if pairs else float("nan")


def rank_quality(scores, lengths) -> RankQuality:
    return RankQuality(kendall_tau(scores, lengths), pairwise_accuracy(scores, lengths),
                       len(scores))


def _arrays(scores, lengths) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(lengths, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and lengths must be 1-D of one length, got {s.shape}, {y.shape}")
    return s, y

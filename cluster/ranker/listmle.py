"""ListMLE (Xia et al., ICML 2008): the ranker's training objective.

The loss of one list is the negative log-likelihood of its true order under
the Plackett-Luce model of the scores: with items sorted shortest output first
(pi), ``-sum_i [s_pi(i) - log sum_{j >= i} exp(s_pi(j))]``. A higher score
therefore means "earlier", i.e. a shorter expected output. Items whose labels
tie (same length bucket) are ordered at random each time a list is drawn,
as allRank's reference implementation does, so no tie order is learned.
"""

from __future__ import annotations

import math

import torch


def listmle(scores: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean ListMLE of a batch of lists.

    scores: (B, L) float, higher = ranked earlier; labels: (B, L), smaller =
    ranked earlier (a length bucket). Ties are broken by a random permutation.
    """
    assert scores.shape == labels.shape and scores.dim() == 2, (scores.shape, labels.shape)
    perm = torch.rand(scores.shape, generator=generator).argsort(-1)  # (B, L) random tie order
    lab = labels.gather(-1, perm)
    order = perm.gather(-1, lab.argsort(dim=-1, stable=True))  # (B, L) true order, ties shuffled
    s = scores.gather(-1, order)  # (B, L) scores in true order
    tail = torch.logcumsumexp(s.flip(-1), -1).flip(-1)  # (B, L) log sum_{j >= i} exp(s_j)
    return (tail - s).sum(-1).mean()


def plackett_luce_nll(scores: list[float], order: list[int]) -> float:
    """Brute-force NLL of ``order`` (indices, first ranked first) under
    Plackett-Luce with ``exp(scores)`` as weights: the reference for tests."""
    nll = 0.0
    for i, item in enumerate(order):
        rest = sum(math.exp(scores[j]) for j in order[i:])
        nll -= math.log(math.exp(scores[item]) / rest)
    return nll

"""The sampler: token ids from a step's logits (torch).

Lifecycle: the engine builds one ``Sampler`` and calls ``sample(logits, rows)``
on every step that produces tokens, one ``SampleRequest`` (its
``SamplingParams`` and output position) per row of logits.

A request with a ``seed`` draws its i-th output token from a generator seeded
by ``(seed, i)``: its samples depend neither on the rest of the batch nor on
which worker (CPU or GPU) draws them, so a request handed from prefill to decode, or
re-dispatched after a worker failure, continues with exactly the same tokens.
"""

from __future__ import annotations

import torch

from workers.sampling import SampleRequest, TokenLogprob


def token_generator(seed: int, position: int) -> torch.Generator:
    """The RNG for output token ``position`` of a request seeded with ``seed``."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + position) % (1 << 63))


class Sampler:
    """Greedy rows in one argmax; stochastic rows each with their own RNG."""

    def __init__(self, seed: int = 0):
        self._default_gen = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor, rows: list[SampleRequest]) -> list[int]:
        # logits: (n, V) float32
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if not row.params.greedy:
                tokens[i] = self._sample_row(logits[i], row)
        return tokens

    def _sample_row(self, logits: torch.Tensor, row: SampleRequest) -> int:
        p = row.params
        # drawn on the host, whatever the logits' device: a seeded request gets the same
        # tokens from a CPU and a GPU worker (their RNGs differ)
        scaled = logits.cpu() / p.temperature  # (V,)
        if p.top_k:
            kth = torch.topk(scaled, min(p.top_k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        gen = self._default_gen if p.seed is None else token_generator(p.seed, row.position)
        return int(torch.multinomial(probs, 1, generator=gen))

    @staticmethod
    def logprobs(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
        lp = torch.log_softmax(logits, dim=-1)  # (V,)
        top = torch.topk(lp, top_n) if top_n else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return TokenLogprob(token_id, float(lp[token_id]), pairs)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p  # mass strictly above each token
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return kept / kept.sum()

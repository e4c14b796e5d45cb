"""Sampling parameters, their validation, and the sampler.

Lifecycle: a ``SamplingParams`` is built by a frontend, validated against the
model (``validate``) before the request touches any engine state, then read by
the ``Sampler`` on every step that produces a token for that request.

A request with a ``seed`` draws its i-th output token from a generator seeded
by ``(seed, i)``: its samples depend neither on the rest of the batch nor on
which worker draws them, so a request handed from prefill to decode, or
re-dispatched after a worker failure, continues with exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 = no top-k cut
    max_tokens: int = 16  # tokens to generate at most
    seed: int | None = None  # per-request RNG seed (reproducible sampling)
    stop_token_ids: tuple[int, ...] = ()  # finish when one is sampled
    stop: tuple[str, ...] = ()  # finish when the text contains one (excluded from text)
    ignore_eos: bool = False  # keep going past the model's EOS
    logprobs: int | None = None  # None = off; n >= 0 = sampled token plus top-n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, prompt_len: int, max_model_len: int) -> None:
        """Raise ``ValueError`` naming the field and its limit."""
        _check(isinstance(self.max_tokens, int) and self.max_tokens > 0,
               f"max_tokens={self.max_tokens!r} must be an integer > 0")
        _check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0")
        _check(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k={self.top_k!r} must be an integer >= 0 (0 disables it)")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20,
               f"logprobs={self.logprobs} must be in [0, 20]")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be a list of non-empty strings")
        _check(prompt_len + self.max_tokens <= max_model_len,
               f"prompt tokens ({prompt_len}) + max_tokens ({self.max_tokens}) = "
               f"{prompt_len + self.max_tokens} exceeds the model's context of "
               f"{max_model_len} tokens")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # log-probability under the model (before temperature)
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class SampleRequest:
    """One row of logits to sample from."""

    params: SamplingParams
    position: int = 0  # index of the output token being drawn


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
        scaled = logits / p.temperature  # (V,)
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

"""Sampling parameters and their validation (pure Python, no torch).

Lifecycle: a ``SamplingParams`` is built by a frontend, validated against the
model (``validate``) before the request touches any engine state, then read by
the ``Sampler`` (``workers.sampler``, torch) on every step that produces a
token for that request. The simulator imports this module without torch;
``from workers.sampling import Sampler`` still works (imported on first use).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def __getattr__(name: str):
    # the torch half lives in workers.sampler; loaded only when asked for
    if name in ("Sampler", "token_generator"):
        from workers import sampler
        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

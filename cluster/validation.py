"""Turning a client's request into (prompt token ids, SamplingParams).

Lifecycle: every frontend (gRPC, HTTP) calls ``build_request`` before the
request touches the controller; any problem raises ``InvalidRequest`` naming
the field, which the frontend maps to INVALID_ARGUMENT / HTTP 400. Nothing
else is changed by a rejected request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from workers.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_REQUEST_ID = 128


class InvalidRequest(ValueError):
    """A request field is missing, of the wrong type, or out of range."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelLimits:
    model_id: str
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class ValidRequest:
    request_id: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


def build_request(limits: ModelLimits, tokenizer, *, model: str | None,
                  prompt: Any = None, messages: Any = None, sampling: dict,
                  request_id: Any = None, render=None) -> ValidRequest:
    """Exactly one of ``prompt`` (text or token ids) and ``messages`` (chat,
    rendered by ``render``: the model's template, or Baton's default)."""
    _check_model(limits, model)
    rid = _request_id(request_id)
    if (prompt is None) == (messages is None):
        raise InvalidRequest("prompt", "give exactly one of a prompt and chat messages")
    tokens = _prompt_tokens(prompt, limits, tokenizer) if prompt is not None else \
        tokenizer.encode((render or render_chat)(parse_messages(messages)))
    if not tokens:
        raise InvalidRequest("prompt", "must not be empty")
    if len(tokens) >= limits.max_model_len:
        raise InvalidRequest("prompt", f"{len(tokens)} tokens leave no room in the model's "
                                       f"context of {limits.max_model_len} tokens")
    params = sampling_params(sampling)
    try:
        params.validate(len(tokens), limits.max_model_len)
    except ValueError as exc:
        raise InvalidRequest(_field_of(str(exc)), str(exc)) from None
    return ValidRequest(rid, tokens, params)


def _check_model(limits: ModelLimits, model: str | None) -> None:
    if model not in (None, "", limits.model_id):
        raise InvalidRequest("model", f"{model!r} is not served here; served: {limits.model_id!r}")


def _request_id(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > MAX_REQUEST_ID or not value.isprintable():
        raise InvalidRequest("request_id", f"must be a printable string of at most "
                                           f"{MAX_REQUEST_ID} characters")
    return value


def _prompt_tokens(prompt: Any, limits: ModelLimits, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt", "must not be empty")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequest("prompt", f"token id {bad} is outside the vocabulary "
                                           f"[0, {limits.vocab_size})")
        return list(prompt)
    raise InvalidRequest("prompt", "must be a string or a list of token ids")


def parse_messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role", "must be system, user or assistant")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string")
        out.append((role, content))
    return out


def render_chat(messages: list[tuple[str, str]]) -> str:
    """Baton's default chat template, for models without one of their own:
    ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + "<|assistant|>\n"


_SAMPLING_FIELDS = {
    "temperature": "number", "top_p": "number", "top_k": "int", "max_tokens": "int",
    "seed": "int", "ignore_eos": "bool", "logprobs": "int", "stop": "stops",
    "stop_token_ids": "ints",
}


def sampling_params(sampling: dict) -> SamplingParams:
    """SamplingParams from a dict of set fields (unknown keys rejected)."""
    unknown = sorted(set(sampling) - set(_SAMPLING_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0] or "sampling", f"unknown field {unknown[0]!r}")
    values = {k: _typed(k, kind, sampling[k]) for k, kind in _SAMPLING_FIELDS.items()
              if sampling.get(k) is not None}
    return SamplingParams(**values)


def _typed(field: str, kind: str, value: Any):
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequest(field, f"must be a finite number, got {value!r}")
        return float(value)
    if kind == "int":
        if not _is_int(value) or abs(value) >= 1 << 63:
            raise InvalidRequest(field, f"must be an integer, got {value!r}")
        return int(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidRequest(field, f"must be a boolean, got {value!r}")
        return value
    if kind == "ints":
        if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
            raise InvalidRequest(field, "must be a list of non-negative integers")
        return tuple(value)
    return _stops(field, value)


def _stops(field: str, value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest(field, "must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise InvalidRequest(field, f"at most {MAX_STOP_STRINGS} strings of at most "
                                    f"{MAX_STOP_LENGTH} characters")
    return tuple(stops)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_of(message: str) -> str:
    """The field a SamplingParams.validate message starts with."""
    head = message.split("=", 1)[0].split(" ", 1)[0]
    return head if head in _SAMPLING_FIELDS else "max_tokens" if "max_tokens" in message else "prompt"

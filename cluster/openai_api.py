"""OpenAI request bodies -> Baton requests, and Baton output -> OpenAI objects.

Lifecycle: pure functions called by the HTTP frontend per request.
``parse_completion`` / ``parse_chat`` check every field (unknown fields and
unsupported features are 400 errors naming the field, never silently
ignored) and return an ``OpenAIRequest``; the ``*_chunk`` / ``*_response``
builders shape what goes back. Extensions beside the OpenAI fields follow
vLLM's names: ``top_k``, ``ignore_eos``, ``return_token_ids``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cluster.validation import (
    InvalidRequest,
    ModelLimits,
    ValidRequest,
    build_request,
    parse_messages,
)

# Fields a client may send that map onto Baton sampling parameters.
_SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
# Fields accepted only at the value that means "off".
_NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "presence_penalty": (0, 0.0),
            "frequency_penalty": (0, 0.0), "logit_bias": ({},), "suffix": ("",),
            "logprobs": (False, 0), "top_logprobs": (0,), "parallel_tool_calls": (False,),
            "tools": ([],), "tool_choice": ("none",)}
_COMMON = {"model", "stream", "stream_options", "user", "max_tokens", "return_token_ids",
           "request_id", *_SAMPLING, *_NEUTRAL}
COMPLETION_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


@dataclass(frozen=True)
class OpenAIRequest:
    valid: ValidRequest
    stream: bool
    include_usage: bool
    return_token_ids: bool


def parse_completion(body: Any, limits: ModelLimits, tokenizer) -> OpenAIRequest:
    body = _object(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if prompt is None:
        raise InvalidRequest("prompt", "is required")
    max_tokens = body.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    return _request(body, limits, tokenizer, max_tokens, prompt=prompt)


def parse_chat(body: Any, limits: ModelLimits, tokenizer, render) -> OpenAIRequest:
    body = _object(body, CHAT_FIELDS)
    if "messages" not in body:
        raise InvalidRequest("messages", "is required")
    messages = [_flatten_content(i, m) for i, m in enumerate(_list(body["messages"]))]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:  # OpenAI's chat default: as much as the context allows
        prompt_len = len(tokenizer.encode(_render_for_length(render, messages)))
        max_tokens = max(1, limits.max_model_len - prompt_len)
    return _request(body, limits, tokenizer, max_tokens, messages=messages, render=render)


def _request(body: dict, limits, tokenizer, max_tokens, **prompt) -> OpenAIRequest:
    _check_neutral(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or set(options) - {"include_usage", "continuous_usage_stats"}):
        raise InvalidRequest("stream_options", "must be an object with include_usage")
    include_usage = bool(options and options.get("include_usage"))
    if include_usage and not isinstance(options.get("include_usage"), bool):
        raise InvalidRequest("stream_options.include_usage", "must be a boolean")
    sampling = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    sampling["max_tokens"] = max_tokens
    valid = build_request(limits, tokenizer, model=_model(body), sampling=sampling,
                          request_id=body.get("request_id"), **prompt)
    return OpenAIRequest(valid, stream, include_usage, _bool(body, "return_token_ids"))


def _object(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(unknown[0] or "body", f"unknown field {unknown[0]!r}")
    return body


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    return model


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(name, f"must be a boolean, got {value!r}")
    return value


def _check_neutral(body: dict) -> None:
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
            raise InvalidRequest(name, f"{value!r} is not supported by this server")


def _list(value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages", "must be a non-empty list")
    return value


def _flatten_content(i: int, message: Any) -> dict:
    """Content may be a string or a list of text parts (OpenAI's newer shape)."""
    if not isinstance(message, dict):
        raise InvalidRequest(f"messages[{i}]", "must be an object")
    extra = sorted(set(message) - {"role", "content", "name"})
    if extra:
        raise InvalidRequest(f"messages[{i}].{extra[0]}", f"unknown field {extra[0]!r}")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidRequest(f"messages[{i}].content[{j}]", "only text parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    return {"role": message.get("role"), "content": content}


def _render_for_length(render, messages: list[dict]) -> str:
    return render(parse_messages(messages))


# ----- responses -------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_choice(text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(text: str | None, finish_reason: str | None, token_ids: list[int] | None,
                delta: bool, first: bool = False) -> dict:
    if delta:
        message = {"role": "assistant", "content": text} if first else (
            {"content": text} if text is not None else {})
        choice = {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def envelope(kind: str, rid: str, model: str, choices: list[dict], created: int | None = None,
             usage_obj: dict | None = None) -> dict:
    """``kind``: text_completion | chat.completion | chat.completion.chunk."""
    prefix = "cmpl-" if kind == "text_completion" else "chatcmpl-"
    out = {"id": prefix + rid, "object": kind, "created": created or int(time.time()),
           "model": model, "choices": choices}
    if usage_obj is not None:
        out["usage"] = usage_obj
    return out


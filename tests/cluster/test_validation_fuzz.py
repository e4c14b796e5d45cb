"""Fuzzing the request validators: whatever a client sends, the outcome is a
valid request or a clean rejection naming a field (INVALID_ARGUMENT / 400),
never a crash."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.http_protocol import HttpError, HttpRequest
from cluster.http_server import HttpFrontend
from cluster.openai_api import CHAT_FIELDS, COMPLETION_FIELDS, parse_chat, parse_completion
from cluster.validation import InvalidRequest, ModelLimits, build_request, render_chat
from workers.tokenizer import ByteTokenizer

LIMITS = ModelLimits("tiny", max_model_len=256, vocab_size=320)
TOKENIZER = ByteTokenizer()

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=20)
token_lists = st.lists(st.integers(-5, 400), max_size=40)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
     "content": st.one_of(st.text(max_size=30), json_values)}), max_size=4)


def _check_request(valid) -> None:
    assert valid.prompt_token_ids and all(0 <= t < LIMITS.vocab_size
                                          for t in valid.prompt_token_ids)
    valid.params.validate(len(valid.prompt_token_ids), LIMITS.max_model_len)


@settings(max_examples=400, deadline=None)
@given(prompt=st.one_of(st.text(max_size=300), token_lists, json_values),
       sampling=st.dictionaries(st.sampled_from(
           ["temperature", "top_p", "top_k", "max_tokens", "seed", "ignore_eos", "logprobs",
            "stop", "stop_token_ids", "bogus"]), json_values, max_size=6),
       model=st.one_of(st.none(), st.sampled_from(["tiny", "", "other"]), json_values),
       request_id=json_values)
def test_build_request_accepts_or_names_a_field(prompt, sampling, model, request_id):
    try:
        valid = build_request(LIMITS, TOKENIZER, model=model, prompt=prompt, sampling=sampling,
                              request_id=request_id)
    except InvalidRequest as exc:
        assert exc.field and str(exc).startswith(exc.field)
        return
    _check_request(valid)


def _openai_bodies(fields: set[str], extra: dict) -> st.SearchStrategy:
    keys = st.sampled_from(sorted(fields) + ["unknown_key"])
    return st.one_of(json_values, st.dictionaries(keys, json_values, max_size=8).map(
        lambda d: {**extra, **d}))


@settings(max_examples=400, deadline=None)
@given(body=_openai_bodies(COMPLETION_FIELDS, {"prompt": "hello"}))
def test_completion_bodies_accept_or_name_a_field(body):
    try:
        spec = parse_completion(body, LIMITS, TOKENIZER)
    except InvalidRequest as exc:
        assert exc.field
        return
    _check_request(spec.valid)


@settings(max_examples=300, deadline=None)
@given(body=_openai_bodies(CHAT_FIELDS, {}), msgs=messages)
def test_chat_bodies_accept_or_name_a_field(body, msgs):
    if isinstance(body, dict) and "messages" not in body:
        body = {**body, "messages": msgs}
    try:
        spec = parse_chat(body, LIMITS, TOKENIZER, render_chat)
    except InvalidRequest as exc:
        assert exc.field
        return
    _check_request(spec.valid)


class _NoBackend:
    async def submit(self, *args):  # pragma: no cover - reached only by a validator bug
        raise AssertionError("an invalid body reached the controller")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(
    lambda v: json.dumps(v).encode())))
def test_http_parse_of_any_bytes_is_a_400_or_a_request(raw):
    frontend = HttpFrontend(_NoBackend(), LIMITS, TOKENIZER)
    request = HttpRequest("POST", "/v1/completions", "HTTP/1.1", {}, raw)
    try:
        spec = frontend._parse(request, lambda b: parse_completion(b, LIMITS, TOKENIZER))
    except HttpError as err:
        assert err.status in (400, 404)
        assert json.loads(err.body())["error"]["message"]
        return
    _check_request(spec.valid)


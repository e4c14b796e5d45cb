"""The OpenAI-compatible HTTP frontend with the official ``openai`` client and
raw HTTP: token-exact output against ``baton generate --engine-only``, the
OpenAI error shape for bad input (no KV block leaked, the server keeps
serving), client disconnects, Prometheus metrics, health and drain."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import replace

import pytest
import ray
from conftest import AUTH_TOKEN, AUTH_TOKEN_ENV
from prometheus_client.parser import text_string_to_metric_families

openai = pytest.importorskip("openai")

CLUSTER = "http-fe"
DECODE = f"{CLUSTER}/decode/0"


@pytest.fixture(scope="module")
def served(ray_cluster, redis_server):
    from cluster.config import load_config
    from cluster.launcher import Deployment

    cfg = load_config("tiny-disagg")
    cfg = replace(cfg, name=CLUSTER, redis=replace(cfg.redis, url=redis_server.url,
                                                   namespace=CLUSTER),
                  server=replace(cfg.server, auth_token_env=AUTH_TOKEN_ENV))
    dep = Deployment(cfg).start()
    port = ray.get(dep.controller.start_frontends.remote(0, 0))["http_port"]
    yield dep, port
    dep.shutdown()


@pytest.fixture(scope="module")
def client(served):
    _, port = served
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=AUTH_TOKEN,
                         max_retries=0, timeout=120)


def engine_only(prompt: str, max_tokens: int, capsys) -> dict:
    from cluster.cli import main

    capsys.readouterr()
    assert main(["generate", prompt, "--engine-only", "--json", "--ignore-eos",
                 "--max-tokens", str(max_tokens)]) == 0
    return json.loads(capsys.readouterr().out)


def free_blocks(dep) -> int:
    return ray.get(dep.workers[DECODE][2].free_blocks.remote())


def wait_free(dep, expected: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while free_blocks(dep) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return free_blocks(dep)


def test_completions_match_the_engine_whole_and_streamed(client, capsys):
    ref = engine_only("The capital of France", 20, capsys)
    whole = client.completions.create(model="tiny", prompt="The capital of France",
                                      max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = whole.choices[0]
    assert choice.text == ref["text"] and choice.model_extra["token_ids"] == ref["token_ids"]
    assert choice.finish_reason == "length"
    prompt_tokens = len(b"The capital of France") + 1  # byte tokenizer + BOS
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 20)

    chunks = list(client.completions.create(
        model="tiny", prompt="The capital of France", max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert text == ref["text"] and ids == ref["token_ids"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_completions_use_the_default_template(client, capsys):
    from cluster.validation import render_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ref = engine_only(render_chat([(m["role"], m["content"]) for m in messages]), 16, capsys)
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == ref["text"]
    assert whole.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref["text"]
    assert stream[-1].choices[0].finish_reason == "length"


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["max_model_len"] == 2048


def post(port: int, path: str, body: bytes, token: str | None = AUTH_TOKEN,
         headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else {}


def j(**kw) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hello", **kw}).encode()


BAD_INPUT = [
    ("empty prompt", j(prompt=""), {}, 400, "prompt"),
    ("prompt of a wrong type", j(prompt=5), {}, 400, "prompt"),
    ("max_tokens of a wrong type", j(max_tokens="ten"), {}, 400, "max_tokens"),
    ("temperature of a wrong type", j(temperature=[1]), {}, 400, "temperature"),
    ("negative max_tokens", j(max_tokens=-3), {}, 400, "max_tokens"),
    ("huge max_tokens", j(max_tokens=10**9), {}, 400, "max_tokens"),
    ("temperature < 0", j(temperature=-0.5), {}, 400, "temperature"),
    ("top_p > 1", j(top_p=1.5), {}, 400, "top_p"),
    ("unknown model", j(model="gpt-4o"), {}, 404, "model"),
    ("prompt over the context limit", j(prompt="x" * 3000, max_tokens=1), {}, 400, "prompt"),
    ("invalid UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', {}, 400, "body"),
    ("malformed JSON", b'{"model": "tiny", "prompt": ', {}, 400, "body"),
    ("unknown field", j(frobnicate=1), {}, 400, "frobnicate"),
    ("unsupported n", j(n=3), {}, 400, "n"),
    ("missing token", j(), {"token": None}, 401, None),
    ("wrong token", j(), {"token": "not-the-token"}, 401, None),
]


@pytest.mark.parametrize("body,kw,status,param", [b[1:] for b in BAD_INPUT],
                         ids=[b[0] for b in BAD_INPUT])
def test_bad_input_gets_the_openai_error_shape(served, body, kw, status, param):
    dep, port = served
    free = free_blocks(dep)
    got, data = post(port, "/v1/completions", body, **kw)
    assert got == status, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param not in (None, "body"):
        assert err["message"].startswith(f"{param}:")
    assert free_blocks(dep) == free
    ok, _ = post(port, "/v1/completions", j(max_tokens=2))
    assert ok == 200  # still serving


def test_oversized_message_is_413_and_the_server_keeps_serving(served):
    dep, port = served
    free = free_blocks(dep)
    body = j(prompt="y" * (17 << 20))
    status, data = post(port, "/v1/completions", body)
    assert status == 413 and data["error"]["code"] == "request_too_large"
    assert free_blocks(dep) == free
    assert post(port, "/v1/completions", j(max_tokens=2))[0] == 200


def test_unknown_route_is_404_and_wrong_method_405(served):
    _, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v1/nothing")
    assert conn.getresponse().status == 404
    conn.close()
    assert post(port, "/v1/models", b"{}")[0] == 405


def test_client_disconnect_mid_stream_frees_the_blocks(served):
    dep, port = served
    free = free_blocks(dep)
    aborted = total(metric_values(port), "baton_request_success_total", finish_reason="abort")
    body = j(prompt="a long one", max_tokens=1500, ignore_eos=True, stream=True)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + AUTH_TOKEN.encode() +
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while received.count(b"data:") < 3:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
    sock.close()
    assert wait_free(dep, free) == free
    # Freed because it was aborted, not because it ran to its end.
    assert total(metric_values(port), "baton_request_success_total",
                 finish_reason="abort") == aborted + 1


def metric_values(port: int) -> dict[str, list]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    text = resp.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(values: dict, name: str, **labels) -> float:
    return sum(v for lab, v in values.get(name, []) if labels.items() <= lab.items())


METRICS = ["baton_time_to_first_token_seconds", "baton_inter_token_latency_seconds",
           "baton_e2e_request_latency_seconds", "baton_request_queue_time_seconds",
           "baton_num_requests_running", "baton_num_requests_waiting",
           "baton_kv_cache_usage_ratio", "baton_kv_transfer_bytes_total",
           "baton_kv_transfer_duration_seconds", "baton_kv_transfer_failures_total",
           "baton_prefix_cache_hits_total",
           "baton_prefix_cache_queries_total", "baton_request_success_total"]


def test_metrics_parse_and_agree_with_the_run(served, client):
    _, port = served
    before = metric_values(port)
    n, max_tokens = 3, 7
    for i in range(n):
        client.completions.create(model="tiny", prompt=f"metrics {i} " * 40, max_tokens=max_tokens,
                                  temperature=0, extra_body={"ignore_eos": True})
    # prefill loads are refreshed twice a second: wait for the refresh that carries
    # these requests (a loaded machine may take several)
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.6)
        after = metric_values(port)
        refreshed = (total(after, "baton_prefix_cache_queries_total")
                     > total(before, "baton_prefix_cache_queries_total")
                     and total(after, "baton_num_requests_running", role="decode") == 0)
        if refreshed or time.monotonic() > deadline:
            break
    names = {name.removesuffix(suffix) for name in after
             for suffix in ("_bucket", "_count", "_sum", "_created", "")}
    assert set(METRICS) <= names | set(after)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("baton_request_success_total", finish_reason="length") == n
    assert delta("baton_time_to_first_token_seconds_count") == n
    assert delta("baton_e2e_request_latency_seconds_count") == n
    assert delta("baton_inter_token_latency_seconds_count") == n * (max_tokens - 1)
    assert delta("baton_request_queue_time_seconds_count", role="prefill") == n
    assert delta("baton_kv_transfer_duration_seconds_count", transport="grpc") == n
    assert delta("baton_kv_transfer_bytes_total", transport="grpc") > 0
    for reason in ("retried", "recomputed"):  # exported at zero before any failure
        assert [v for lab, v in after["baton_kv_transfer_failures_total"]
                if lab == {"transport": "grpc", "reason": reason}] == [0.0]
    assert delta("baton_prefix_cache_queries_total") > 0
    assert total(after, "baton_num_requests_running", role="decode") == 0
    assert total(after, "baton_num_requests_waiting", role="prefill") == 0
    for labels, v in after["baton_kv_cache_usage_ratio"]:
        assert labels["gpu_type"] in ("H100", "L40S") and 0.0 <= v <= 1.0
    e2e = delta("baton_e2e_request_latency_seconds_sum")
    ttft = delta("baton_time_to_first_token_seconds_sum")
    assert 0 < ttft <= e2e


def test_health_then_drain_refuses_new_work(served):
    """Last in this module: draining ends the frontends' service."""
    dep, port = served

    def health() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        return status

    assert health() == 200
    ray.get(dep.controller.drain_frontends.remote())
    assert health() == 503
    status, data = post(port, "/v1/completions", j(max_tokens=2))
    assert status == 503 and data["error"]["code"] == "draining"
    ray.get(dep.controller.stop_frontends.remote(5.0))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).recv(1)

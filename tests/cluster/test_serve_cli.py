"""``baton serve`` as a user runs it: a subprocess that joins the Ray cluster,
serves gRPC and HTTP on the given ports, answers both with the engine's
tokens, and exits 0 after draining on SIGTERM."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

from cluster.client import BatonClient


def wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float) -> str:
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            seen.append(line)
            if needle in line:
                return line
    if proc.poll() is not None:
        seen.append(proc.stdout.read())  # an early exit's traceback, whole
    raise AssertionError(f"no {needle!r} from baton serve; output:\n{''.join(seen)}")


def test_baton_serve_answers_grpc_and_http_then_drains_on_sigterm(ray_cluster):
    cluster, _ = ray_cluster
    # Port 0: the server binds free ports and names them in its banner (a port
    # picked here could be taken by a Ray worker before the server binds it).
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--grpc-port", "0",
         "--http-port", "0", "--ray-address", cluster.address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = wait_for_line(proc, "baton: serving", 180)
        ports = re.search(r"gRPC port (\d+) and HTTP port (\d+)", banner)
        assert ports, banner
        grpc_port, http_port = (int(p) for p in ports.groups())
        assert grpc_port > 0 and http_port > 0 and grpc_port != http_port
        with BatonClient(f"127.0.0.1:{grpc_port}") as client:
            via_grpc = client.generate("serve me", max_tokens=8, temperature=0.0,
                                       ignore_eos=True)
        body = json.dumps({"prompt": "serve me", "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            via_http = json.loads(resp.read())["choices"][0]
        assert via_http["token_ids"] == via_grpc.token_ids and len(via_grpc.token_ids) == 8
        assert via_http["text"] == via_grpc.text
        # SIGTERM while a stream is in flight: the stream still ends whole.
        with BatonClient(f"127.0.0.1:{grpc_port}") as client:
            stream = client.stream("in flight", max_tokens=300, temperature=0.0,
                                   ignore_eos=True)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            *rest, final = list(stream)
        wait_for_line(proc, "baton: draining", 30)
        streamed = first.token_ids + [t for d in rest for t in d.token_ids]
        assert final.finish_reason == "length" and len(streamed) == 300
        assert final.token_ids == streamed
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

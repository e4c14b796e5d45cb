"""A password-protected Redis, as the chart deploys it, is reachable from
every place Baton connects: the password comes from the variable the
config's ``redis.password_env`` names, read in the connecting process."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import redis

from cluster.config import ClusterConfig
from cluster.redis_server import free_port

PASSWORD_ENV, PASSWORD = "BATON_TEST_REDIS_PASSWORD", "pw-from-a-secret"
POOLS = [{"name": "p", "role": "prefill", "gpu_type": "H100"},
         {"name": "d", "role": "decode", "gpu_type": "L40S"}]


@pytest.fixture(scope="module")
def secured_redis():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", PASSWORD],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=PASSWORD, decode_responses=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", client
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def config(secured_redis, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    url, _ = secured_redis
    return ClusterConfig.from_dict({"name": "pw", "pools": POOLS, "redis": {
        "url": url, "namespace": "pw-test", "password_env": PASSWORD_ENV}})


def test_worker_heartbeat_authenticates_from_the_named_variable(config, secured_redis):
    from cluster.launcher import Deployment
    from workers.worker_config import start_heartbeat

    spec = Deployment(config)._spec(config.pools[1], 0)
    assert spec.redis_password_env == PASSWORD_ENV  # the name crosses Ray, not the password
    beat = start_heartbeat(spec)
    try:
        _, client = secured_redis
        assert client.hexists("pw-test:workers", "pw/d/0")
        assert client.exists("pw-test:hb:pw/d/0")
    finally:
        beat.stop()


def test_controller_state_store_authenticates(config):
    from cluster.controller import Controller

    controller = Controller(config, {})

    async def ping():
        try:
            return await controller.store.ping()
        finally:
            await controller.store.close()

    assert asyncio.run(ping()) is True


def test_serve_checks_redis_with_the_password(config):
    from cluster.serve import _redis_reachable
    from cluster.state import password_from_env

    assert _redis_reachable(config.redis.url, password_from_env(config.redis.password_env))
    assert not _redis_reachable(config.redis.url)  # refused without it


def test_unset_variable_is_named(monkeypatch):
    from cluster.state import password_from_env

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ValueError, match=f"redis.password_env: environment variable "
                                         f"'{PASSWORD_ENV}' is not set"):
        password_from_env(PASSWORD_ENV)
    assert password_from_env(None) is None

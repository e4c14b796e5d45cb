"""Redis Pub/Sub token channels against a real redis-server: a publisher's
messages reach a subscriber in order and decode to what was sent; a password
is used and a wrong one fails loudly; a subscriber whose Redis goes away
raises (its caller falls back), a publisher returns False and recovers."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import redis

from cluster.redis_server import RedisServer, free_port
from cluster.token_channel import (
    Publisher,
    RespConnection,
    Subscriber,
    TokenSlice,
    decode_batch,
    decode_tokens,
    encode_batch,
    encode_tokens,
    events_channel,
)
from workers.gpu import GPUStats
from workers.messages import TokenEvent, WorkerLoad

LOAD = WorkerLoad("c/decode/0", "decode", "L40S", 0, 2, 100, 128, 16, 2048, 64,
                  "emulated:L40S", 5, 3, GPUStats("gpu", 1, 2, 0.5, 300.0))


def test_batches_and_tokens_round_trip_through_json():
    events = [TokenEvent("a", [1], "x", None), TokenEvent("b", [2, 3], "yz\u00e9", "length")]
    b = decode_batch(encode_batch(7, events, LOAD, 12.5))
    assert (b.start, b.events, b.load, b.load_at) == (7, events, LOAD, 12.5)
    assert decode_batch(encode_batch(0, [], None, 1.0)).load is None
    assert decode_tokens(encode_tokens(4, [9, 8], ["a", ""], 2.0)) == \
        TokenSlice(4, [9, 8], ["a", ""], 2.0)


async def _collect(sub: Subscriber, n: int, timeout_s: float = 5.0) -> list[tuple]:
    async def until_n() -> list[tuple]:
        got: list[tuple] = []
        while len(got) < n:
            got += await sub.messages()
        return got
    return await asyncio.wait_for(until_n(), timeout_s)


def test_published_messages_reach_the_subscriber_in_order(redis_server):
    channel = events_channel("tc", "w/decode/0", "abc")
    sent = [encode_batch(i, [TokenEvent("r", [i], str(i), None)], None, float(i))
            for i in range(300)]  # more than a publisher leaves unread: it waits for replies

    async def go():
        sub = await Subscriber.open(redis_server.url, None)
        await sub.subscribe(channel)
        pub = Publisher(redis_server.url, None, channel)
        assert all(pub.publish(p) for p in sent)
        got = await _collect(sub, len(sent))
        pub.close()
        conn = await RespConnection.open(redis_server.url, None)
        conn.publish_nowait(channel, "after")  # fire-and-forget from asyncio
        assert await _collect(sub, 1) == [(channel.encode(), b"after")]
        await sub.unsubscribe(channel)
        assert await conn.command("PUBLISH", channel, "nobody") == 0
        conn.close()
        sub.close()
        return got

    got = asyncio.run(go())
    assert {c for c, _ in got} == {channel.encode()}
    assert [p.decode() for _, p in got] == sent


@pytest.fixture
def private_redis():
    """A redis-server with a password, on a port of its own."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--requirepass", "pw-token-channel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port, password="pw-token-channel")
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_password_is_used_and_a_wrong_one_is_refused(private_redis):
    url = private_redis

    async def go():
        sub = await Subscriber.open(url, "pw-token-channel")
        await sub.subscribe("k")
        pub = Publisher(url, "pw-token-channel", "k")
        assert pub.healthy and pub.publish("m")
        assert await _collect(sub, 1) == [(b"k", b"m")]
        sub.close()
        pub.close()
        with pytest.raises(redis.RedisError):
            await Subscriber.open(url, "wrong")

    asyncio.run(go())
    assert not Publisher(url, "wrong", "k").healthy


def test_lost_redis_fails_the_subscriber_and_the_publisher_recovers():
    server = RedisServer().start()
    pub = Publisher(server.url, None, "k", retry_s=0.0)
    assert pub.publish("a")

    async def lose():
        sub = await Subscriber.open(server.url, None)
        await sub.subscribe("k")
        server.stop()
        with pytest.raises(redis.RedisError):
            await asyncio.wait_for(sub.messages(), 5.0)

    asyncio.run(lose())
    results = [pub.publish("b") for _ in range(3)]
    assert results[-1] is False and not pub.healthy
    again = RedisServer(port=server.port).start()
    try:
        assert pub.publish("c") and pub.healthy
    finally:
        pub.close()
        again.stop()

"""How tokens reach the controller and a driver client, without Ray: a fake
decode worker publishes numbered event batches on a real Redis channel; the
controller delivers each event once, fetches what a lost message carried
from the worker's mailbox, and follows the worker through Ray when its
channel falls silent. The driver client's merge of its two feeds yields each
position once, in order."""

from __future__ import annotations

import asyncio
import random
import time

from test_controller_batching import FakeDecode, FakeHandle, FakePrefill, items, make_controller

import cluster.token_follower as token_follower
from cluster.controller import StreamChunk, _public_url
from cluster.ray_client import _Merge
from cluster.token_channel import Publisher, TokenSlice, encode_batch
from workers.mailbox import Mailbox
from workers.messages import PrefillResult, TokenEvent
from workers.sampling import SamplingParams

STEPS = 3  # decode steps after the prefill's token; the last one finishes the request
PARAMS = SamplingParams(temperature=0, max_tokens=1 + STEPS, ignore_eos=True)


class ContinuingPrefill(FakePrefill):
    """The prefill's token (7) does not finish the request: decode follows."""

    async def submit_prefills(self, jobs):
        self.results.put([PrefillResult(j.request_id, 7, "x", None, True, 1, 0, 0.0, 0.0, 0.0,
                                        generation=j.generation) for j in jobs])
        return [""] * len(jobs)


class ChannelDecode(FakeDecode):
    """Admitted requests get STEPS events (tokens 10, 11, 12), one batch per
    step, numbered in a mailbox and published on a Redis channel, except the
    batches in ``drop`` (a lost message) or every batch if ``silent``."""

    def __init__(self, worker_id: str, url: str, drop=(), silent: bool = False):
        super().__init__(worker_id, "decode")
        self.box: Mailbox[TokenEvent] = Mailbox()
        self.channel = f"{worker_id}:events:test"
        self.pub = Publisher(url, None, self.channel)
        self.drop, self.silent, self.batches = set(drop), silent, 0

    async def event_channel(self):
        return self.channel

    async def admit_batch(self, items, timeout_s=60.0):
        asyncio.get_running_loop().call_later(0.01, self._emit, [it.request_id for it in items])
        return ["admitted"] * len(items)

    def _emit(self, request_ids: list[str]) -> None:
        for step in range(STEPS):
            events = [TokenEvent(rid, [10 + step], "t", "length" if step == STEPS - 1 else None)
                      for rid in request_ids]
            first = self.box.put(events)
            if not self.silent and self.batches not in self.drop:
                self.pub.publish(encode_batch(first, events, None, time.time()))
            self.batches += 1

    async def next_outputs(self, cursor, timeout_s=1.0):
        events, end = await self.box.since(cursor, timeout_s)
        return events, end, self.load_

    async def stream_outputs(self, cursor, idle_s=1.0, events=True):
        if not events:
            while True:
                await asyncio.sleep(idle_s)
                yield [], self.box.end(), None, 0.0
        async for batch, end in self.box.follow(cursor, idle_s):
            yield batch, end, self.load_, time.time()


def channel_controller(redis_server, ns: str, **decode_kw):
    ctl, _, _ = make_controller(redis_server, ns)
    d = FakeHandle(ChannelDecode(f"{ns}/decode/0", redis_server.url, **decode_kw))
    p = FakeHandle(ContinuingPrefill(f"{ns}/prefill/0", "prefill"))
    ctl._worker_args = {f"{ns}/prefill/0": ("prefill", "H100", p),
                        f"{ns}/decode/0": ("decode", "L40S", d)}
    return ctl, d


async def tokens_of(ctl, ids: list[str]) -> list[list[int]]:
    out = []
    for rid in ids:
        tokens, cursor, finished = [], 0, False
        while not finished:
            chunk = await ctl.stream(rid, cursor, 5.0)
            tokens += chunk.token_ids
            cursor, finished = chunk.cursor, chunk.finished
        out.append(tokens)
    return out


def test_events_come_through_redis_each_once(redis_server):
    ns = f"ev-{random.randrange(1 << 30)}"

    async def go():
        ctl, d = channel_controller(redis_server, ns)
        await ctl.start()
        assert [w["events_via"] for w in (await ctl.status())["workers"]] == [None, "redis"]
        await ctl.submit_many(items(4, "a"))
        assert await tokens_of(ctl, [f"a{i}" for i in range(4)]) == [[7, 10, 11, 12]] * 4
        # followed with heartbeats only: no event came through Ray
        assert all(args[1:] == (token_follower.HEARTBEAT_S, False)
                   for args in d.called("stream_outputs"))
    asyncio.run(go())


def test_a_lost_message_is_fetched_from_the_worker(redis_server):
    ns = f"ev-{random.randrange(1 << 30)}"

    async def go():
        ctl, d = channel_controller(redis_server, ns, drop={1})
        await ctl.start()
        await ctl.submit_many(items(2, "b"))
        assert await tokens_of(ctl, ["b0", "b1"]) == [[7, 10, 11, 12]] * 2
        assert len(d.called("next_outputs")) == 2  # start-up, then the gap
    asyncio.run(go())


def test_a_silent_channel_falls_back_to_ray(redis_server, monkeypatch):
    monkeypatch.setattr(token_follower, "HEARTBEAT_S", 0.05)
    ns = f"ev-{random.randrange(1 << 30)}"

    async def go():
        ctl, d = channel_controller(redis_server, ns, silent=True)
        await ctl.start()
        await ctl.submit_many(items(2, "c"))
        assert await tokens_of(ctl, ["c0", "c1"]) == [[7, 10, 11, 12]] * 2
        assert [w["events_via"] for w in (await ctl.status())["workers"]] == [None, "ray"]
        assert any(len(args) == 1 for args in d.called("stream_outputs"))  # events via Ray
    asyncio.run(go())


# ----- the driver client's merge ------------------------------------------------------
def _chunk(start: int, ids: list[int], finished: bool = False) -> StreamChunk:
    texts = [f"<{t}>" for t in ids]
    return StreamChunk("r", ids, "".join(texts), start + len(ids), finished,
                       "length" if finished else None, {"ttft_s": 0.1}, [1.0] * len(ids), texts)


def _slice(start: int, ids: list[int]) -> TokenSlice:
    return TokenSlice(start, ids, [f"<{t}>" for t in ids], 2.0)


def test_merge_yields_each_position_once_in_order():
    m = _Merge("r", 0)
    assert m.add(_slice(2, [2])) is None  # overtook the catch-up chunk: waits
    got = m.add(_chunk(0, [0, 1]))  # the catch-up chunk fills the gap
    assert (got.token_ids, got.text, got.cursor) == ([0, 1, 2], "<0><1><2>", 3)
    assert got.token_times == [1.0, 1.0, 2.0]
    assert m.add(_slice(1, [1, 2])) is None  # already yielded
    assert m.add(_slice(3, [3])).token_ids == [3]
    assert m.add(_chunk(0, [0, 1, 2, 3])) is None  # a safety-net chunk with nothing new
    final = m.add(_chunk(2, [2, 3, 4], finished=True))
    assert (final.token_ids, final.text, final.finished, final.finish_reason) == \
        ([4], "<4>", True, "length")
    assert final.cursor == 5 and final.timing == {"ttft_s": 0.1}


def test_merge_resumes_from_a_cursor():
    m = _Merge("r", 3)
    assert m.add(_chunk(3, [], finished=False)) is None
    assert m.add(_slice(3, [9])).token_ids == [9]
    final = m.add(_chunk(3, [9], finished=True))
    assert (final.token_ids, final.finished, final.cursor) == ([], True, 4)


def test_the_channel_url_a_client_gets_carries_no_credentials():
    assert _public_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert _public_url("redis://:pw@h:6380/2") == "redis://h:6380/2"
    assert _public_url("rediss://u:pw@h:1/0?ssl_cert_reqs=none&password=x") == \
        "rediss://h:1/0?ssl_cert_reqs=none"
    assert _public_url("unix://:pw@/tmp/r.sock?db=1") == "unix:///tmp/r.sock?db=1"

"""The Redis state store against a real redis-server."""

from __future__ import annotations

import asyncio
import random
import time

from cluster.state import Heartbeat, JournalBatcher, StateStore
from workers.sampling import SamplingParams


def run(coro):
    return asyncio.run(coro)


def store(redis_server) -> StateStore:
    return StateStore(redis_server.url, f"t{random.randrange(1 << 30)}", completed_cap=3,
                      finished_ttl_s=60)


def test_journal_round_trip_and_finish(redis_server):
    async def go():
        s = store(redis_server)
        params = SamplingParams(temperature=0.5, max_tokens=9, stop=("x",), stop_token_ids=(3,))
        await s.journal_new("a", [1, 2, 3], params, 12.5)
        await s.journal_new("b", [4], SamplingParams(), 13.0)
        await s.journal_tokens([("a", [7, 8], ["p", "q"]), ("b", [9], ["r"])])
        await s.journal_tokens([("a", [10], ["s"])])
        entries = await s.inflight()
        assert [(e.request_id, e.prompt_token_ids, e.token_ids, e.texts) for e in entries] == [
            ("a", [1, 2, 3], [7, 8, 10], ["p", "q", "s"]), ("b", [4], [9], ["r"])]
        assert entries[0].params == params and entries[0].arrival_s == 12.5
        await s.journal_finish("a", "length", {"prompt_tokens": 3, "output_tokens": 3})
        assert [e.request_id for e in await s.inflight()] == ["b"]
        done = await s.lookup("a")
        assert (done.state, done.finish_reason, done.token_ids) == ("finished", "length", [7, 8, 10])
        assert await s.completed() == [
            {"prompt_tokens": 3, "output_tokens": 3, "finish_reason": "length"}]
        await s.close()
    run(go())


def test_completed_log_is_capped_newest_first(redis_server):
    async def go():
        s = store(redis_server)
        for i in range(5):
            await s.journal_new(f"r{i}", [1], SamplingParams(), 0.0)
            await s.journal_finish(f"r{i}", "stop", {"output_tokens": i})
        assert [c["output_tokens"] for c in await s.completed()] == [4, 3, 2]
        await s.close()
    run(go())


def test_prefix_index_counts_leading_blocks_per_worker(redis_server):
    async def go():
        s = store(redis_server)
        await s.index_prefix("w0", [11, 12, 13])
        await s.index_prefix("w1", [11, 99])
        assert await s.prefix_hits([11, 12, 13, 14]) == {"w0": 3, "w1": 1}
        assert await s.prefix_hits([50]) == {}
        await s.close()
    run(go())


def test_heartbeat_registers_and_expires(redis_server):
    async def go(ns):
        s = StateStore(redis_server.url, ns)
        result = await s.workers()
        await s.close()
        return result
    ns = f"hb{random.randrange(1 << 30)}"
    hb = Heartbeat(redis_server.url, ns, "w0", {"role": "decode"}, period_s=0.1, ttl_s=1)
    time.sleep(0.3)
    assert run(go(ns)) == {"w0": {"role": "decode", "alive": True}}
    hb.stop()
    assert run(go(ns)) == {"w0": {"role": "decode", "alive": False}}


def test_batcher_writes_one_tick_in_one_command_and_acks_new_once_written(redis_server):
    async def go():
        s = store(redis_server)
        batcher = JournalBatcher(s)
        futs = [batcher.new(f"r{i}", [i, i + 1], SamplingParams(max_tokens=4), float(i))
                for i in range(20)]
        batcher.route("r0", "p", "d")
        batcher.tokens([("r0", [5, 6], ["a", "\N{SNOWMAN}"]), ("r1", [7], ["b"])])
        assert batcher.flushes == 0  # nothing sent within this tick
        await asyncio.gather(*futs)
        assert (batcher.flushes, batcher.writes) == (1, 23)
        entries = {e.request_id: e for e in await s.inflight()}
        assert sorted(entries) == sorted(f"r{i}" for i in range(20))  # recovery sees them all
        assert (entries["r0"].token_ids, entries["r0"].texts) == ([5, 6], ["a", "\N{SNOWMAN}"])
        assert entries["r3"].prompt_token_ids == [3, 4] and entries["r3"].arrival_s == 3.0
        assert (await s.r.hget(s._k("req", "r0"), "decode_worker")) == "d"
        for i in range(20):
            batcher.finish(f"r{i}", "length", {"output_tokens": i})
        await batcher.flushed()
        assert batcher.flushes == 2 and await s.inflight() == []
        assert [c["output_tokens"] for c in await s.completed()] == [19, 18, 17]  # capped at 3
        assert (await s.lookup("r0")).state == "finished"
        await s.close()
    run(go())


def test_batcher_holds_token_writes_until_lazy_s_or_other_writes(redis_server):
    async def go():
        s = store(redis_server)
        batcher = JournalBatcher(s, lazy_s=1.0)
        await batcher.new("a", [1], SamplingParams(), 0.0)
        batcher.tokens([("a", [7], ["x"])])
        await asyncio.sleep(0.05)
        assert batcher.flushes == 1 and (await s.lookup("a")).token_ids == []
        batcher.tokens([("a", [8], ["y"])])
        await batcher.new("b", [2], SamplingParams(), 0.0)  # carries the tokens along
        assert batcher.flushes == 2 and (await s.lookup("a")).token_ids == [7, 8]
        batcher.lazy_s = 0.05
        batcher.tokens([("a", [9], ["z"])])
        deadline = time.monotonic() + 5
        while batcher.flushes < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert batcher.flushes == 3 and (await s.lookup("a")).token_ids == [7, 8, 9]
        await s.close()
    run(go())


def test_batcher_refuses_new_writes_when_redis_is_away():
    async def go():
        s = StateStore("redis://127.0.0.1:1/0", "gone")
        batcher = JournalBatcher(s)
        fut = batcher.new("a", [1], SamplingParams(), 0.0)
        batcher.tokens([("a", [7], ["x"])])
        try:
            await fut
        except Exception as exc:  # noqa: BLE001 - the type is redis's
            return type(exc).__name__
        return None
    assert run(go()) is not None


def test_apply_splits_long_writes(redis_server):
    async def go():
        s = store(redis_server)
        ops = [s.op_new("a", [1], SamplingParams(), 0.0),
               s.op_tokens("a", list(range(2500)), ["t"] * 2500)]
        ops += [s.op_route(f"x{i}", "p", "d") for i in range(5)]
        await s.apply(ops, per_command=3)
        entry = await s.lookup("a")
        assert entry.token_ids == list(range(2500)) and len(entry.texts) == 2500
        assert await s.r.hget(s._k("req", "x4"), "state") == "running"
        await s.close()
    run(go())

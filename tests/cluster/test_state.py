"""The Redis state store against a real redis-server."""

from __future__ import annotations

import asyncio
import random
import time

from cluster.state import Heartbeat, StateStore
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

"""The controller's batched dispatch, in-process against a real Redis: fake
worker handles (no Ray) record every call, so a round is checked to cost one
call per worker and one journal command, and recovery is checked to see
every request a submit acknowledged."""

from __future__ import annotations

import asyncio
import inspect
import random
from dataclasses import replace

import cluster.controller as controller_module
from cluster.config import load_config
from cluster.controller import Controller, SubmitItem
from cluster.state import StateStore
from workers.mailbox import Mailbox
from workers.messages import PrefillResult, WorkerLoad
from workers.sampling import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


class _Method:
    def __init__(self, handle: FakeHandle, name: str):
        self.handle, self.name = handle, name

    def options(self, **_):
        return self

    def remote(self, *args):
        self.handle.calls.append((self.name, args))
        fn = getattr(self.handle.impl, self.name)
        if inspect.isasyncgenfunction(fn):  # a streaming generator yields object refs
            return _refs(fn(*args))
        return fn(*args)


async def _refs(gen):
    async for item in gen:
        ref = asyncio.get_running_loop().create_future()
        ref.set_result(item)
        yield ref


class FakeHandle:
    """Stands in for a Ray actor handle: ``handle.method.remote(...)``."""

    def __init__(self, impl):
        self.impl, self.calls = impl, []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    def called(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]


class FakeWorker:
    def __init__(self, worker_id: str, role: str):
        self.worker_id, self.role = worker_id, role
        self.load_ = WorkerLoad(worker_id, role, "H100", 0, 0, 1 << 16, 1 << 16, 16, 2048, 64)

    async def load(self):
        return self.load_

    async def kv_endpoint(self) -> str:
        return "127.0.0.1:1"

    async def model_info(self) -> dict:
        return {"max_model_len": 4096, "vocab_size": 256, "eos_token_ids": [0]}

    async def abort(self, request_id: str) -> bool:
        return True

    async def ping(self) -> str:
        return self.worker_id


class FakeDecode(FakeWorker):
    async def reserve_batch(self, items, release=()):
        return [[0] * -(-len(it.token_ids) // 16) for it in items]

    async def release_batch(self, request_ids):
        return [True] * len(request_ids)

    async def next_outputs(self, cursor, timeout_s=1.0):
        return [], cursor, self.load_

    async def stream_outputs(self, cursor, idle_s=1.0):
        while True:
            await asyncio.sleep(idle_s)
            yield [], cursor, self.load_, 0.0


class FakePrefill(FakeWorker):
    """Every job's result (token 7, finished by length) is ready at once,
    unless ``answer`` is False (a prefill worker that hangs)."""

    def __init__(self, worker_id: str, role: str, answer: bool = True):
        super().__init__(worker_id, role)
        self.answer, self.results = answer, Mailbox()

    async def submit_prefills(self, jobs):
        if self.answer:
            self.results.put([PrefillResult(j.request_id, 7, "x", "length", True, 1, 0, 0.0,
                                            0.0, 0.0, generation=j.generation) for j in jobs])
        return [""] * len(jobs)

    async def next_results(self, cursor, timeout_s=1.0):
        results, end = await self.results.since(cursor, timeout_s)
        return results, end, self.load_

    async def stream_results(self, cursor, idle_s=1.0):
        async for results, end in self.results.follow(cursor, idle_s):
            yield results, end, self.load_


def make_controller(redis_server, namespace: str, answer: bool = True):
    cfg = load_config("tiny-disagg")
    cfg = replace(cfg, name=namespace,
                  redis=replace(cfg.redis, url=redis_server.url, namespace=namespace))
    p = FakeHandle(FakePrefill(f"{namespace}/prefill/0", "prefill", answer))
    d = FakeHandle(FakeDecode(f"{namespace}/decode/0", "decode"))
    workers = {f"{namespace}/prefill/0": ("prefill", "H100", p),
               f"{namespace}/decode/0": ("decode", "L40S", d)}
    return Controller(cfg, workers, redis_password=None), p, d


async def finish_all(ctl: Controller, ids: list[str]) -> list[list[int]]:
    out = []
    for rid in ids:
        chunk = await ctl.stream(rid, 0, 5.0)
        while not chunk.finished:
            chunk = await ctl.stream(rid, 0, 5.0)
        out.append(chunk.token_ids)
    return out


def items(n: int, prefix: str = "r") -> list[SubmitItem]:
    rng = random.Random(0)
    return [SubmitItem(f"{prefix}{i}", [rng.randrange(256) for _ in range(20)], PARAMS)
            for i in range(n)]


def test_a_round_costs_one_call_per_worker_and_one_journal_command(redis_server, monkeypatch):
    # long enough that the next round comes first even on a loaded two-core box
    monkeypatch.setattr(controller_module, "RELEASE_DELAY_S", 1.5)
    ns = f"batch-{random.randrange(1 << 30)}"

    async def go():
        ctl, p, d = make_controller(redis_server, ns)
        await ctl.start()
        flushes = ctl.journal.flushes
        outcomes = await ctl.submit_many(items(12) + [SubmitItem("bad", [], PARAMS)])
        assert [o.error for o in outcomes] == [""] * 12 + ["ValueError"]
        assert ctl.journal.flushes == flushes + 1  # 12 entries, one Redis command
        assert await finish_all(ctl, [f"r{i}" for i in range(12)]) == [[7]] * 12
        assert [len(a[0]) for a in d.called("reserve_batch")] == [12]
        assert [len(a[0]) for a in p.called("submit_prefills")] == [12]
        await ctl.submit_many(items(3, "s"))  # the next round's reserve frees the 12
        await finish_all(ctl, ["s0", "s1", "s2"])
        assert [len(a[1]) for a in d.called("reserve_batch")] == [0, 12]
        assert d.called("release_batch") == []
        await asyncio.sleep(3.0)  # no next round: released after RELEASE_DELAY_S
        assert [len(a[0]) for a in d.called("release_batch")] == [3]
        await ctl.journal.flushed()
        assert len(await ctl.store.completed()) == 15 and await ctl.store.inflight() == []
    asyncio.run(go())


def test_every_acknowledged_submit_is_recovered_by_a_new_controller(redis_server):
    ns = f"recover-{random.randrange(1 << 30)}"

    async def go():
        stuck, _, _ = make_controller(redis_server, ns, answer=False)
        await stuck.start()
        outcomes = await stuck.submit_many(items(9, "q"))
        assert all(not o.error for o in outcomes)
        store = StateStore(redis_server.url, ns)  # what a restarted controller reads
        assert sorted(e.request_id for e in await store.inflight()) == [f"q{i}" for i in range(9)]
        await store.close()
        fresh, _, _ = make_controller(redis_server, ns)
        assert await fresh.start() == 9
        assert await finish_all(fresh, [f"q{i}" for i in range(9)]) == [[7]] * 9
    asyncio.run(go())


def test_stream_never_moves_a_cursor_back(redis_server):
    """After a restart the journal may hold fewer tokens than a client has
    seen; the chunk must keep the client's cursor (no duplicate later)."""
    ns = f"cursor-{random.randrange(1 << 30)}"

    async def go():
        ctl, _, _ = make_controller(redis_server, ns, answer=False)
        await ctl.start()
        await ctl.submit_many(items(1, "c"))
        chunk = await ctl.stream("c0", 5, 0.05)
        assert (chunk.token_ids, chunk.cursor, chunk.finished) == ([], 5, False)
    asyncio.run(go())

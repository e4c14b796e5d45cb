"""DecodeWorker without Ray: KV reservations expire when never used, and a
failed transfer falls back to recomputing the prompt."""

from __future__ import annotations

import asyncio
import time

from workers.decode_worker import DecodeWorker
from workers.sampling import SamplingParams
from workers.worker_config import WorkerSpec

SPEC = WorkerSpec(worker_id="t/decode/0", role="decode", pool="decode", gpu_type="L40S",
                  model="tiny", dtype="float32", max_model_len=None, block_size=16,
                  kv_cache_bytes=8 << 20, max_num_seqs=8, max_num_batched_tokens=256,
                  prefill_chunk_size=256, transport="local", lease_s=0.3)


def test_unused_reservation_is_released_when_its_lease_expires():
    async def go():
        worker = DecodeWorker(SPEC)
        total = await worker.free_blocks()
        blocks = await worker.reserve("r", list(range(40)))
        assert len(blocks) == 3 and await worker.free_blocks() == total - 3
        deadline = time.monotonic() + 5
        while await worker.free_blocks() != total and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await worker.free_blocks() == total
        assert await worker.release("r") is False  # already gone
        worker.loop.stop()
    asyncio.run(go())


def test_admit_without_kv_recomputes_and_matches_the_engine():
    from workers.engine import EngineConfig, LLMEngine

    prompt = list(range(10, 60))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = LLMEngine(EngineConfig()).generate([prompt], params)[0].token_ids

    async def go():
        worker = DecodeWorker(SPEC)
        await worker.reserve("r", prompt)
        outcome = await worker.admit("r", prompt, ref[:1], params, timeout_s=0.2)
        tokens = list(ref[:1])
        cursor = 0
        while len(tokens) < 6:
            events, cursor, _ = await worker.next_outputs(cursor, 1.0)
            tokens += [t for e in events for t in e.token_ids]
        worker.loop.stop()
        return outcome, tokens, worker.recomputed
    outcome, tokens, recomputed = asyncio.run(go())
    assert (outcome, recomputed) == ("recomputed", 1)
    assert tokens == ref


def test_batched_reserve_admit_release_and_streamed_outputs():
    from workers.engine import EngineConfig, LLMEngine
    from workers.messages import AdmitItem, ReserveItem

    prompts = [list(range(10, 30)), list(range(40, 75))]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ref = LLMEngine(EngineConfig()).generate(prompts, params)

    async def go():
        worker = DecodeWorker(SPEC)
        total = await worker.free_blocks()
        blocks = await worker.reserve_batch([ReserveItem("a", prompts[0]),
                                             ReserveItem("b", prompts[1]),
                                             ReserveItem("c", list(range(1 << 16)))])
        assert [len(b) if b else b for b in blocks] == [2, 3, None]  # 16-token blocks; c: no room
        assert await worker.free_blocks() == total - 5
        assert await worker.release_batch(["b", "zz"]) == [True, False]
        outcomes = await worker.admit_batch(
            [AdmitItem("a", prompts[0], ref[0].token_ids[:1], params),
             AdmitItem("b", prompts[1], ref[1].token_ids[:1], params)], timeout_s=0.2)
        assert outcomes == ["recomputed", "aborted"]  # no KV sent; b's reservation is gone
        tokens, loads = list(ref[0].token_ids[:1]), []
        gen = worker.stream_outputs(0, idle_s=0.05)
        while len(tokens) < 4:
            events, _, load, load_at = await gen.__anext__()
            tokens += [t for e in events if e.request_id == "a" for t in e.token_ids]
            loads.append(load)  # None when unchanged since the previous item
        await gen.aclose()
        assert tokens == ref[0].token_ids and load_at > 0
        assert loads[0].worker_id == SPEC.worker_id
        assert await worker.submit_batch([AdmitItem("d", [], [], params)]) != [""]  # refused
        worker.loop.stop()
    asyncio.run(go())

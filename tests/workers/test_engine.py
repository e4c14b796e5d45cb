"""LLMEngine against a naive full-recompute forward, continuous batching,
prefix reuse, sampling, verification and bad input."""

from __future__ import annotations

import random

import pytest
import torch

from workers.sampling import SamplingParams
from workers.sequence import FinishReason

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
MIXED_LENS = [1, 7, 16, 33, 64, 100, 257, 300]


def prompts_of(lens: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lens]


def naive_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits that chose them, recomputing everything."""
    ids, logits = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            row = model.forward_dense(torch.tensor(ids))[-1]
            logits.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt):], torch.stack(logits)


class LogitSpy:
    """Records the sampling logits the runner returns for each request."""

    def __init__(self, engine):
        self.engine, self.rows = engine, {}
        self._run = engine.runner.run
        engine.runner.run = self

    def __call__(self, items, on_layer=None):
        out = self._run(items, on_layer)
        live = [s for s in self.engine.running]
        by_table = {tuple(self.engine.blocks.block_table(s.request_id)): s.request_id for s in live}
        for item, lg in zip(items, out):
            if lg is not None:
                self.rows.setdefault(by_table[tuple(item.block_table)], []).append(lg[-1].clone())
        return out


def assert_equals_naive_recompute(engine, model, prompts) -> None:
    """Greedy ids identical and logits within 1e-4 of a full recompute; blocks all freed."""
    spy = LogitSpy(engine)
    outs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_logits = naive_greedy(model, prompt, 32)
        assert out.token_ids == ref_tokens
        got = torch.stack(spy.rows[out.request_id])
        assert torch.allclose(got, ref_logits, atol=1e-4, rtol=0)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_paged_chunked_engine_equals_naive_recompute(make_engine, tiny_model):
    engine = make_engine(prefill_chunk_size=64, max_num_batched_tokens=256)
    assert_equals_naive_recompute(engine, tiny_model.model, prompts_of(MIXED_LENS))


def test_joining_and_leaving_mid_batch_changes_no_other_request(make_engine):
    prompts = prompts_of([40, 90, 17], seed=1)
    alone = [make_engine().generate([p], GREEDY)[0].token_ids for p in prompts]
    engine = make_engine(prefill_chunk_size=32)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    got = {"a": [], "b": [], "c": []}
    for step in range(200):
        if step == 5:
            engine.add_request("c", prompts[2], GREEDY)
        if step == 12:
            assert engine.abort("b")
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert got["a"] == alone[0] and got["c"] == alone[2]
    assert got["b"] == alone[1][:len(got["b"])] and len(got["b"]) < 32
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prefix_reuse_shares_blocks_and_computes_only_the_suffix(make_engine):
    prefix = prompts_of([128], seed=2)[0]
    first, second = prefix + [7] * 20, prefix + [9] * 30
    engine = make_engine(block_size=16)
    engine.add_request("first", first, GREEDY)
    engine.step()  # whole prompt prefilled in one chunk
    first_blocks = list(engine.blocks.block_table("first"))
    while engine.has_unfinished():
        engine.step()
    before = engine.stats.prefill_tokens
    engine.add_request("second", second, GREEDY)
    engine.step()
    seq = engine.sequence("second")
    assert seq.num_cached_tokens == 128
    assert engine.blocks.block_table("second")[:8] == first_blocks[:8]
    assert engine.stats.prefill_tokens - before == 30
    tokens = list(seq.output_token_ids)
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    fresh = make_engine(enable_prefix_caching=False).generate([second], GREEDY)[0]
    assert tokens == fresh.token_ids


def test_preemption_under_kv_pressure_keeps_outputs_exact(make_engine):
    prompts = prompts_of([60, 50, 70, 40], seed=3)
    ref = make_engine().generate(prompts, GREEDY)
    engine = make_engine(num_kv_blocks=14, block_size=16)  # fits ~2 requests at a time
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert engine.blocks.num_free_blocks == 14


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_engine):
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1234, max_tokens=24,
                       ignore_eos=True)
    prompt = prompts_of([30], seed=4)[0]
    alone = make_engine().generate([prompt], p)[0].token_ids
    others = prompts_of([10, 80], seed=5)
    mixed = make_engine().generate(
        others + [prompt], [SamplingParams(temperature=1.0, max_tokens=24)] * 2 + [p])
    assert mixed[2].token_ids == alone
    other_seed = make_engine().generate([prompt], SamplingParams(
        temperature=0.9, top_k=50, top_p=0.9, seed=99, max_tokens=24, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_one_is_greedy(make_engine):
    prompt = prompts_of([25], seed=6)[0]
    greedy = make_engine().generate([prompt], GREEDY)[0].token_ids
    topk1 = make_engine().generate([prompt], SamplingParams(
        temperature=1.5, top_k=1, max_tokens=32, ignore_eos=True, seed=3))[0].token_ids
    assert topk1 == greedy


def test_stop_token_ids_and_eos_finish_with_stop(make_engine, tiny_model):
    prompt = prompts_of([12], seed=7)[0]
    ref, _ = naive_greedy(tiny_model.model, prompt, 10)
    out = make_engine().generate([prompt], SamplingParams(
        temperature=0, max_tokens=10, stop_token_ids=(ref[3],)))[0]
    first = ref.index(ref[3])
    assert out.token_ids == ref[:first + 1] and out.finish_reason is FinishReason.STOP
    length = make_engine().generate([prompt], SamplingParams(temperature=0, max_tokens=5,
                                                             ignore_eos=True))[0]
    assert length.finish_reason is FinishReason.LENGTH and len(length.token_ids) == 5


def test_stop_string_cuts_text_before_it(make_engine):
    prompt = "stop strings are matched on text"
    full = make_engine().generate([prompt], SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True))[0].text
    ascii_at = next(i for i in range(4, len(full) - 3) if full[i:i + 2].isascii()
                    and full[i:i + 2].isprintable())
    stop = full[ascii_at:ascii_at + 2]
    out = make_engine().generate([prompt], SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == full[:full.find(stop)]


def test_logprobs_match_naive_log_softmax(make_engine, tiny_model):
    prompt = prompts_of([20], seed=8)[0]
    out = make_engine().generate([prompt], SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=3))[0]
    _, logits = naive_greedy(tiny_model.model, prompt, 4)
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(ref[i, lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[i].topk(3).indices.tolist()


def test_verify_scores_all_draft_positions_in_one_pass(make_engine, tiny_model):
    prompt = prompts_of([45], seed=9)[0]
    ref_tokens, ref_logits = naive_greedy(tiny_model.model, prompt, 8)
    engine = make_engine()
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # prefill, samples ref_tokens[0]
    draft = ref_tokens[1:5]
    logits = engine.verify("r", draft)
    assert logits.shape == (5, tiny_model.config.vocab_size)
    assert torch.allclose(logits, ref_logits[1:6], atol=1e-4, rtol=0)
    outs = engine.accept("r", draft + [int(logits[-1].argmax())])
    assert [o.new_token_ids[0] for o in outs] == ref_tokens[1:6]
    rest = [t for o in engine.stream() for t in o.new_token_ids]
    assert ref_tokens[:6] + rest == ref_tokens


BAD_INPUTS = [
    ("", GREEDY, "prompt must not be empty"),
    ([], GREEDY, "prompt must not be empty"),
    ([5, 320], GREEDY, r"token id 320 is outside the vocabulary \[0, 320\)"),
    ([5, -1], GREEDY, "token id -1 is outside the vocabulary"),
    ([5], SamplingParams(max_tokens=0), "max_tokens=0 must be an integer > 0"),
    ([5], SamplingParams(max_tokens=-3), "max_tokens=-3"),
    ([5], SamplingParams(temperature=-0.1), "temperature=-0.1 must be >= 0"),
    ([5], SamplingParams(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    ([5], SamplingParams(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    ([5], SamplingParams(top_k=-1), "top_k=-1 must be an integer >= 0"),
    ([5] * 2000, SamplingParams(max_tokens=100), r"= 2100 exceeds the model's context of 2048"),
]


@pytest.mark.parametrize("prompt,params,message", BAD_INPUTS,
                         ids=["empty-str", "empty-list", "vocab-high", "vocab-negative",
                              "max-tokens-zero", "max-tokens-negative", "temperature",
                              "top-p-zero", "top-p-high", "top-k", "context"])
def test_bad_input_raises_and_leaves_engine_unchanged(make_engine, prompt, params, message):
    engine = make_engine()
    engine.add_request("ok", [1, 2, 3], GREEDY)
    free = engine.blocks.num_free_blocks
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert [s.request_id for s in engine.waiting] == ["ok"]
    assert engine.blocks.num_free_blocks == free
    assert engine.generate([[1, 2, 3]], GREEDY)[0].token_ids == \
        make_engine().generate([[1, 2, 3]], GREEDY)[0].token_ids


def test_duplicate_request_id_is_rejected(make_engine):
    engine = make_engine()
    engine.add_request("x", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        engine.add_request("x", [3], GREEDY)


# ----- the CPU decode buffer (workers.kv_cache.DecodeKVBuffer) --------------
def test_decode_buffer_equals_paged_decode_across_bucket_moves(make_engine):
    # contexts cross the 64 / 128 / 256-token bucket boundaries while decoding
    prompts = prompts_of([50, 60, 120, 250, 7], seed=10)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    paged = make_engine(decode_buffer_bytes=0, prefill_chunk_size=64)
    buffered = make_engine(prefill_chunk_size=64)
    spies = LogitSpy(paged), LogitSpy(buffered)
    ref = paged.generate(prompts, params)
    got = buffered.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(ref, got):
        rows_a = torch.stack(spies[0].rows[a.request_id])
        rows_b = torch.stack(spies[1].rows[b.request_id])
        assert torch.allclose(rows_a, rows_b, atol=1e-5, rtol=0)
    assert buffered.runner.decode_buffer.nbytes == 0  # everyone finished: buckets dropped


def test_decode_buffer_over_budget_falls_back_to_paged(make_engine):
    prompts = prompts_of([30, 90], seed=11)
    ref = make_engine(decode_buffer_bytes=0).generate(prompts, GREEDY)
    small = make_engine(decode_buffer_bytes=1024)  # not one 64-token slot
    assert [o.token_ids for o in small.generate(prompts, GREEDY)] == [o.token_ids for o in ref]
    assert small.runner.decode_buffer.nbytes == 0


def test_verify_after_buffered_decodes_then_partial_accept(make_engine, tiny_model):
    prompt = prompts_of([61], seed=12)[0]
    ref_tokens, _ = naive_greedy(tiny_model.model, prompt, 14)
    engine = make_engine()
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    for _ in range(4):  # prefill + 3 buffered decodes (context crosses 64)
        engine.step()
    assert engine.runner.decode_buffer.length("r") == 64
    draft = ref_tokens[4:6] + [(ref_tokens[6] + 1) % 256]  # third draft token is wrong
    logits = engine.verify("r", draft)
    assert [int(t) for t in logits.argmax(-1)[:3]] == ref_tokens[4:7]
    engine.accept("r", ref_tokens[4:7])  # two accepted + the target's own token
    rest = [t for o in engine.stream() for t in o.new_token_ids]
    assert ref_tokens[:7] + rest == ref_tokens


def _buffer_case(budget: int = 1 << 30):
    from workers.kv_cache import DecodeKVBuffer, KVCache
    from workers.model_config import tiny_config

    cache = KVCache(tiny_config(), num_blocks=40, block_size=16, dtype=torch.float32)
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(0)))
    return cache, DecodeKVBuffer(cache, budget)


def _held(buf, cache, seq_id: str, table: list[int], n: int) -> bool:
    """The buffer holds the paged KV of positions [0, n) of the sequence."""
    bucket, entry = buf._where[seq_id]
    paged = cache.data[:, :, table].flatten(2, 3)[:, :, :n].transpose(2, 3)
    return torch.equal(bucket.data[:, :, entry.slot, :, :n], paged)


def test_decode_buffer_groups_rows_by_bucket_and_fills_holes():
    cache, buf = _buffer_case()
    tables = {"a": [0, 1, 2, 3, 4], "b": [5, 6], "c": [7, 8, 9, 10, 11, 12, 13, 14, 15]}
    starts = {"a": 70, "b": 20, "c": 130}  # buckets 128, 64, 256
    step = buf.place(list(tables), [starts[s] for s in tables], list(tables.values()))
    assert step.order == [1, 0, 2]  # b (64), a (128), c (256)
    assert [(g.rows, g.context_len) for g in step.groups] == [(1, 21), (1, 71), (1, 131)]
    assert all(_held(buf, cache, s, tables[s], starts[s]) for s in tables)
    step = buf.place(["a", "b"], [71, 21], [tables["a"], tables["b"]])  # c left
    assert "c" not in buf and [g.rows for g in step.groups] == [1, 1]
    buf.place(["a", "b", "d"], [72, 22, 30], [tables["a"], tables["b"], [16, 17]])
    assert buf._where["d"][1].slot == 1 and buf.length("d") == 31
    buf.forget("b")  # leaves a hole; the next step moves d (the last slot) into it
    step = buf.place(["a", "d"], [73, 31], [tables["a"], [16, 17]])
    assert buf._where["d"][1].slot == 0 and _held(buf, cache, "d", [16, 17], 30)
    assert [(g.rows, g.context_len) for g in step.groups] == [(1, 32), (1, 74)]
    bucket = buf._where["d"][0]
    assert torch.count_nonzero(bucket.data[:, :, 0, :, 32:]) == 0  # past d's new token


def test_decode_buffer_recopies_when_blocks_change_or_kv_is_rewritten():
    cache, buf = _buffer_case()
    buf.place(["a"], [40], [[0, 1, 2]])
    buf.place(["a"], [41], [[0, 1, 2]])
    assert buf.length("a") == 42
    buf.place(["a"], [41], [[3, 4, 5]])  # same id, other blocks (e.g. after re-admission)
    assert _held(buf, cache, "a", [3, 4, 5], 41)
    buf.truncate("a", 20)  # a chunk rewrote positions 20.. in the paged cache
    assert buf.length("a") == 20
    cache.data[:, :, 4, 4:].add_(1.0)  # positions 20..31 of "a" change in the paged cache
    cache.data[:, :, 5].add_(1.0)  # and 32..47
    buf.place(["a"], [41], [[3, 4, 5]])
    assert _held(buf, cache, "a", [3, 4, 5], 41) and buf.length("a") == 42


def test_decode_buffer_beyond_budget_returns_none_and_empties():
    cache, buf = _buffer_case(budget=8 * 64 * buf_bytes_per_token())  # 8 slots of 64
    tables = [[i] for i in range(9)]
    assert buf.place([f"s{i}" for i in range(4)], [10] * 4, tables[:4]) is not None
    assert buf.nbytes == 8 * 64 * buf_bytes_per_token()  # slots grow by 8s
    assert buf.place([f"s{i}" for i in range(9)], [10] * 9, tables) is None
    assert buf.nbytes == 0 and "s0" not in buf


def buf_bytes_per_token() -> int:
    from workers.model_config import tiny_config

    cfg = tiny_config()
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4


# ----- the C++ CPU kernels (EngineConfig.cpu_kernels) ------------------------
@pytest.fixture(scope="module")
def cpu_kernel():
    from kernels import cpu_kernels

    if not cpu_kernels.load():
        pytest.skip("the C++ CPU kernels cannot be built here")


def test_cpu_kernels_equals_naive_recompute(make_engine, tiny_model, cpu_kernel):
    engine = make_engine(prefill_chunk_size=64, max_num_batched_tokens=256,
                         cpu_kernels=True)
    assert engine.runner.cpu_kernels and engine.runner.decode_buffer is None
    assert_equals_naive_recompute(engine, tiny_model.model, prompts_of(MIXED_LENS, seed=20))


def test_cpu_kernels_under_preemption_and_verification(make_engine, tiny_model, cpu_kernel):
    prompts = prompts_of([60, 50, 70, 40], seed=3)
    ref = make_engine().generate(prompts, GREEDY)
    tight = make_engine(num_kv_blocks=14, block_size=16, cpu_kernels=True)
    assert [o.token_ids for o in tight.generate(prompts, GREEDY)] == [r.token_ids for r in ref]
    prompt = prompts_of([61], seed=12)[0]
    ref_tokens, _ = naive_greedy(tiny_model.model, prompt, 14)
    engine = make_engine(cpu_kernels=True)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    for _ in range(4):  # prefill + 3 decodes through the kernel
        engine.step()
    draft = ref_tokens[4:6] + [(ref_tokens[6] + 1) % 256]  # third draft token is wrong
    logits = engine.verify("r", draft)
    assert [int(t) for t in logits.argmax(-1)[:3]] == ref_tokens[4:7]
    engine.accept("r", ref_tokens[4:7])
    rest = [t for o in engine.stream() for t in o.new_token_ids]
    assert ref_tokens[:7] + rest == ref_tokens


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", ""])
def test_bad_device_name_is_rejected(device):
    from workers.engine import EngineConfig

    with pytest.raises(ValueError, match="device="):
        EngineConfig(device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda_is_a_clear_error(tiny_model):
    from workers.engine import EngineConfig, LLMEngine

    with pytest.raises(ValueError, match="no CUDA device"):
        LLMEngine(EngineConfig(device="cuda"), loaded=tiny_model)


@pytest.mark.parametrize("chunk", [64, 512])
def test_padded_prefill_equals_naive_recompute(make_engine, tiny_model, chunk):
    # the GPU's prefill layout (fresh prompts in one padded causal call; chunks with
    # cached context one by one), forced on CPU: chunk 64 mixes both kinds in a step
    engine = make_engine(prefill_chunk_size=chunk, max_num_batched_tokens=1024)
    engine.runner.padded_prefill = True
    batches = []
    real = engine.runner._padded
    engine.runner._padded = lambda segs: batches.append(real(segs)) or batches[-1]
    assert_equals_naive_recompute(engine, tiny_model.model, prompts_of(MIXED_LENS, seed=7))
    assert any(b is not None and b.num_seqs >= 2 for b in batches)

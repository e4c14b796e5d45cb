"""The engine on a CUDA device: the same tokens as on CPU and as a full
recompute, Triton decode attention in the loop, seeded sampling that does
not depend on the device, half precision, prefix reuse, HF parity."""

from __future__ import annotations

import pytest
import torch
from test_engine import GREEDY, MIXED_LENS, prompts_of  # tests/workers, on the path

from workers.engine import EngineConfig, LLMEngine
from workers.loader import load_model
from workers.sampling import SamplingParams


def engine(device: str, **overrides) -> LLMEngine:
    overrides.setdefault("kv_cache_bytes", 64 << 20)
    return LLMEngine(EngineConfig(model="tiny", device=device, **overrides))


def test_cuda_engine_gives_the_cpu_engines_greedy_tokens():
    prompts = prompts_of(MIXED_LENS)
    cpu = engine("cpu", prefill_chunk_size=64).generate(prompts, GREEDY)
    gpu_engine = engine("cuda", prefill_chunk_size=64)
    assert gpu_engine.kv_cache.data.is_cuda and gpu_engine.runner.decode_buffer is None
    gpu = gpu_engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    assert gpu_engine.blocks.num_free_blocks == gpu_engine.blocks.num_blocks


def test_cuda_engine_equals_naive_recompute_on_the_gpu():
    eng = engine("cuda", prefill_chunk_size=64, max_num_batched_tokens=256)
    model = eng.loaded.model
    rows: dict[str, list[torch.Tensor]] = {}
    run = eng.runner.run

    def spy(items, on_layer=None):
        out = run(items, on_layer)
        for it, lg in zip(items, out):
            if lg is not None:
                rows.setdefault(it.seq_id, []).append(lg[-1].clone())
        return out

    eng.runner.run = spy
    prompts = prompts_of(MIXED_LENS, seed=3)
    outs = eng.generate(prompts, GREEDY)
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        ids, ref = list(prompt), []
        with torch.inference_mode():
            for _ in range(32):
                row = model.forward_dense(torch.tensor(ids, device="cuda"))[-1]
                ref.append(row)
                ids.append(int(row.argmax()))
        assert out.token_ids == ids[len(prompt):]
        worst = max(worst, (torch.stack(rows[out.request_id]) - torch.stack(ref)).abs().max().item())
    assert worst < 1e-3, worst


def test_decode_attention_runs_the_triton_kernel(monkeypatch):
    import kernels.paged_attention as pa

    calls = []
    real = pa._paged_decode_triton
    monkeypatch.setattr(pa, "_paged_decode_triton", lambda *a: calls.append(1) or real(*a))
    eng = engine("cuda", cuda_graphs=False)
    eng.generate(prompts_of([20, 45]), SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(calls) == 3 * eng.model_config.num_layers  # 3 decode steps, eager


def test_seeded_sampling_is_the_same_on_cpu_and_gpu():
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=24,
                            ignore_eos=True)
    prompts = prompts_of([12, 80], seed=5)
    cpu = engine("cpu").generate(prompts, params)
    gpu = engine("cuda").generate(prompts, params)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_and_tracks_float32(dtype):
    prompts = prompts_of([30, 150, 64], seed=9)
    ref = engine("cuda").generate(prompts, GREEDY)
    got = engine("cuda", dtype=dtype).generate(prompts, GREEDY)
    first = sum(g.token_ids[:4] == r.token_ids[:4] for g, r in zip(got, ref))
    assert first >= 2  # random weights: a near-tie may flip one sequence


def test_prefix_blocks_are_reused_on_the_gpu():
    eng = engine("cuda")
    shared = prompts_of([128], seed=2)[0]
    a = eng.generate([shared + [1, 2, 3]], GREEDY)[0]
    b = eng.generate([shared + [4, 5]], GREEDY)[0]
    assert b.num_cached_tokens == 128
    fresh = engine("cuda").generate([shared + [4, 5]], GREEDY)[0]
    assert b.token_ids == fresh.token_ids and a.token_ids


def test_hf_parity_on_the_gpu(tmp_path):
    pytest.importorskip("transformers")
    from hf_fixtures import HF_CASES, build_hf_model, save_hf_dir

    case = HF_CASES[0]
    hf = build_hf_model(case)
    path = save_hf_dir(hf, case, tmp_path / case.name)
    hf = hf.cuda()
    ours = load_model(str(path), "float32").model.cuda()
    ids = torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0].float()
        got = ours.forward_dense(ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_cuda_device_that_does_not_exist_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA device"):
        engine(f"cuda:{torch.cuda.device_count()}")


def test_cuda_graphs_give_the_eager_tokens():
    # requests of different lengths: the decode batch shrinks step by step, so several
    # graph sizes are captured and most steps run padded rows
    prompts = prompts_of([5, 40, 90, 130, 200, 17, 64, 250, 33], seed=11)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in (3, 9, 17, 25, 32, 40, 48, 56, 64)]
    eager = engine("cuda", cuda_graphs=False).generate(prompts, params)
    graphed_engine = engine("cuda")
    graphed = graphed_engine.generate(prompts, params)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
    graphs = graphed_engine.runner.graphs
    assert graphs.replays > 40 and len(graphs.graphs) >= 4
    assert graphed_engine.blocks.num_free_blocks == graphed_engine.blocks.num_blocks


def test_long_prompt_in_chunks_equals_naive_recompute_on_the_gpu():
    # chunks after the first attend to the KV cached before them (lower-right causal)
    eng = engine("cuda", prefill_chunk_size=256, max_num_batched_tokens=512)
    prompt = prompts_of([1500], seed=13)[0]
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8,
                                                ignore_eos=True))[0]
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(8):
            ids.append(int(eng.loaded.model.forward_dense(torch.tensor(ids, device="cuda"))[-1]
                           .argmax()))
    assert out.token_ids == ids[len(prompt):]

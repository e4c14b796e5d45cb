import pytest

from sim.hardware import get_gpu
from sim.latency import (
    EfficiencyProfile,
    LatencyModel,
    kv_blocks_from_memory,
    kv_bytes_per_token,
    profile_for,
    sim_dtype,
    weight_bytes_per_gpu,
)
from sim.models import get_model

FLAT = EfficiencyProfile("flat", 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)


def test_decode_step_is_the_weight_read_at_batch_one():
    m, gpu = get_model("llama-3.1-8b"), get_gpu("H100")
    lat = LatencyModel(m, gpu, 1, "bf16", FLAT)
    t = lat.step_time(1, 1, 1, 1, ())
    # every weight but the embedding table (a gather) is read once
    weights = (m.num_parameters() - m.vocab_size * m.hidden_size) * 2 / gpu.memory_bw
    assert t == pytest.approx(weights, rel=0.01)


def test_attention_uses_each_requests_own_kv_length():
    lat = LatencyModel(get_model("llama-3.1-8b"), get_gpu("H100"), 1, "bf16", FLAT)
    # a compute-bound chunk (2000 new, 0 cached) and a memory-bound one (16 new over
    # 8000 cached) cost less than two chunks of the batch mean (1008 over 4000)
    own = lat.step_time(2016, 2, 2, 0, ((2000, 0), (16, 8000)))
    mean = lat.step_time(2016, 2, 2, 0, ((1008, 4000), (1008, 4000)))
    assert own < mean
    assert lat.step_time(64, 64, 64, 64 * 2000, ()) < lat.step_time(64, 64, 64, 64 * 8000, ())


def test_tensor_parallelism_shrinks_compute_bound_steps():
    m, gpu = get_model("llama-2-70b"), get_gpu("A100")
    prof = profile_for("A100-80GB")
    t2 = LatencyModel(m, gpu, 2, "bf16", prof).step_time(4096, 1, 1, 0, ((4096, 0),))
    t8 = LatencyModel(m, gpu, 8, "bf16", prof).step_time(4096, 1, 1, 0, ((4096, 0),))
    assert t8 < t2 / 2


def test_fp8_is_one_byte_per_weight_and_kv_element():
    m = get_model("llama-3.1-8b")
    assert kv_bytes_per_token(m, 1, "fp8") * 2 == kv_bytes_per_token(m, 1, "bf16") == 131072
    assert weight_bytes_per_gpu(m, 1, "fp8") * 2 == weight_bytes_per_gpu(m, 1, "bf16")
    assert sim_dtype("float8_e4m3fn") == "fp8"
    for gpu in ("H100", "A100"):  # A100 has no FP8 tensor cores: weight-only W8A16
        fp8, bf16 = (LatencyModel(m, get_gpu(gpu), 1, d, FLAT) for d in ("fp8", "bf16"))
        # batch one is the weight read: half the bytes
        assert fp8.step_time(1, 1, 1, 1, ()) == pytest.approx(bf16.step_time(1, 1, 1, 1, ()) / 2,
                                                              rel=0.02)
    h100, a100 = get_gpu("H100"), get_gpu("A100")
    assert h100.peak_flops("fp8") == 1978.9e12  # FP8 tensor cores
    assert a100.peak_flops("fp8") == a100.peak_flops("bf16")


def test_kv_capacity_from_memory_and_models_that_do_not_fit():
    m = get_model("llama-3.1-70b")
    with pytest.raises(ValueError, match="does not fit"):
        kv_blocks_from_memory(m, get_gpu("H100"), 1, "bf16", 16)
    # (4 x 80 GB x 0.9 - 141.1 GB weights - 4 x 2 GB reserve) / (327,680 B/token x 16)
    assert kv_blocks_from_memory(m, get_gpu("H100"), 4, "bf16", 16) == 26491


def test_catalog_entries_and_aliases():
    from sim.hardware import GPUS
    for name in ("A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe",
                 "H200", "B200", "cpu"):
        g = GPUS[name]
        assert g.sources and g.memory_bw > 0 and g.price_per_hour > 0
    assert get_gpu("H100").name == "H100-SXM"
    with pytest.raises(ValueError, match="'V100' is not in the catalog"):
        get_gpu("V100")

"""Mooncake hash ids become prompt blocks that hash alike, so the engine's
BlockManager reuses them and the prefix-aware router follows them."""

from sim.runner import simulate
from sim.workload import WorkloadSpec


def test_shared_prefixes_are_reused(make_spec, tmp_path):
    wl = WorkloadSpec(arrival="trace", trace="mooncake", num_requests=40, time_scale=1.0,
                      data_dir=tmp_path)  # the committed sample
    spec = make_spec("colocated", gpu="H100", replicas=2, router="prefix-aware",
                     prefix_caching=True, batch={"max_num_seqs": 64, "max_num_batched_tokens": 8192,
                                                 "prefill_chunk_size": 8192})
    res = simulate(spec, wl)
    hits = sum(w.blocks.prefix_hits for w in res.workers)
    queries = sum(w.blocks.prefix_queries for w in res.workers)
    assert res.summary.completed == 40
    assert 0 < hits < queries
    cold = simulate(make_spec("colocated", gpu="H100", replicas=2, prefix_caching=False,
                              batch={"max_num_seqs": 64, "max_num_batched_tokens": 8192,
                                     "prefill_chunk_size": 8192}), wl)
    computed = sum(w.stats.prefill_tokens for w in res.workers)
    assert computed < sum(w.stats.prefill_tokens for w in cold.workers)

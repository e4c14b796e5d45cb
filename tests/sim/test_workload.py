import pytest

from sim.workload import WorkloadSpec, build_workload, load_trace, trace_path


def test_poisson_is_seeded_and_has_the_rate():
    a = build_workload(WorkloadSpec(arrival="poisson", rate=5.0, num_requests=2000, seed=3)).initial()
    b = build_workload(WorkloadSpec(arrival="poisson", rate=5.0, num_requests=2000, seed=3)).initial()
    assert [r.arrival_s for r in a] == [r.arrival_s for r in b]
    assert a[0].arrival_s == 0.0
    assert 4.5 < len(a) / a[-1].arrival_s < 5.5
    assert {(r.prompt_tokens, r.output_tokens) for r in a} == {(512, 128)}


def test_gamma_burstiness_changes_gaps_not_mean_rate():
    r = build_workload(WorkloadSpec(arrival="gamma", rate=5.0, cv=3.0, num_requests=4000, seed=1)).initial()
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(r, r[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert 0.17 < mean < 0.23 and 2.5 < cv < 3.5


def test_closed_loop_releases_one_request_per_completion():
    w = build_workload(WorkloadSpec(arrival="closed", concurrency=3, num_requests=5))
    assert [r.index for r in w.initial()] == [0, 1, 2]
    nxt = w.next_after(7.5)
    assert (nxt.index, nxt.arrival_s) == (3, 7.5)
    assert w.next_after(8.0).index == 4
    assert w.next_after(9.0) is None


def test_azure_trace_replay_with_time_scale(tmp_path):
    # the committed sample (first 300 rows) is used when ../shared is absent
    w = WorkloadSpec(arrival="trace", trace="azure-conv", num_requests=4, time_scale=2.0,
                     data_dir=tmp_path)
    reqs = build_workload(w).initial()
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(374, 44), (396, 109), (879, 55), (91, 16)]
    assert reqs[1].arrival_s == pytest.approx((50.9951690 - 46.6805900) / 2.0, abs=1e-6)


def test_mooncake_sample_keeps_hash_ids(tmp_path):
    rows = load_trace("mooncake", tmp_path)
    assert rows[0].hash_ids[:3] == (0, 1, 2) and rows[0].prompt_tokens == 6758
    assert trace_path("sharegpt", tmp_path) is None  # never committed


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="arrival 'uniform'"):
        WorkloadSpec(arrival="uniform")
    with pytest.raises(ValueError, match="rate=0"):
        WorkloadSpec(rate=0)

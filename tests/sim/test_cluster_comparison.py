"""The simulator against the real cluster: the calibration's arithmetic on
exact synthetic timings, and a smoke run of benchmarks/sim_vs_cluster.py (a
few requests through a real local cluster and through the simulator; the
accuracy targets are the benchmark's)."""

import shutil

import pytest

from sim.cluster_probe import ClusterRun, Probe, _batch_step, _fit_control
from sim.workload import Request


def run(i, prompt, out, first_s, step_s, admit_s=0.0, arrival_s=0.0, **timing):
    times = [first_s] + [first_s + admit_s + step_s * k for k in range(1, out)]
    return ClusterRun(Request(i, 0.0, prompt, out), f"c{i}", arrival_s, tuple(times), timing)


def test_batch_step_is_the_time_per_token_while_all_decode():
    runs = [run(0, 32, 64, 1.00, 0.01), run(1, 32, 64, 1.05, 0.01)]
    step, kv = _batch_step(runs)
    assert step == pytest.approx(0.01) and kv == 2 * (32 + 32)


def test_control_plane_and_link_recovered_from_exact_timings():
    # tiny: 4 layers; each prompt: prefill_s by length, last layer verified 0.2 ms
    # + its bytes at 1 GB/s after it was handed over, first token 3 ms after that,
    # dispatch 5 ms before the prefill, the second token 2 ms + one step later
    probes = []
    for i, n in enumerate((32, 128, 512)):
        kv, prefill = 2048 * n, 0.02 + n * 1e-4
        done = 0.005 + prefill - 0.001  # last layer handed over 1 ms before sampling
        landed = done + 2e-4 + kv / 4 / 1e9
        r = run(i, n, 16, landed + 0.003, 0.006, admit_s=0.002, prefill_s=prefill, kv_bytes=kv,
                queue_s=0.001, prefill_queue_s=0.0)
        probes.append(Probe(r, (done - 0.002, done), (landed - 0.001, landed)))
    options, report = _fit_control(probes, "tiny")
    c = options["control"]
    assert options["link_bandwidth"] == pytest.approx(1e9, rel=1e-6)
    assert options["link_latency_s"] == pytest.approx(2e-4, abs=1e-9)
    assert (c.result_s, c.admit_s) == (pytest.approx(0.003), pytest.approx(0.002))
    # the rest of TTFT: 5 ms dispatch + the 1 ms the engine spends after the last layer
    assert c.dispatch_s == pytest.approx(0.004) and c.first_token_waits_for_kv


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_same_workload_on_the_cluster_and_in_the_simulator():
    pytest.importorskip("ray")
    from sim.cluster_probe import LocalCluster, cluster_timings, decode_samples
    from sim.control import cluster_options
    from sim.engine_profile import compare, sim_timings
    from sim.runner import simulate
    from sim.spec import spec_from_cluster_config
    from sim.workload import WorkloadSpec, build_workload

    wl = WorkloadSpec(arrival="poisson", rate=4.0, num_requests=6, lengths="fixed", isl=64, osl=8)
    with LocalCluster() as cluster:
        real = cluster.run(build_workload(wl).initial())
        config = cluster.config
        batches = decode_samples(cluster, shapes=((3, 40),), reps=1, output_tokens=12)
    (b,) = batches  # three requests decoding together: one token step of three
    assert (b.kind, b.num_tokens, b.num_seqs, b.decode_ctx_sum) == ("token", 3, 3, 3 * (40 + 6))
    assert 0 < b.seconds < 1
    spec = spec_from_cluster_config(config, hardware="cpu", **cluster_options("cpu"))
    simulated = sim_timings(simulate(spec, wl))
    assert [t.request_id for t in cluster_timings(real)] == [t.request_id for t in simulated]
    # admitted on the first try; the key may be missing: a request this short can decode
    # all its tokens, and its last chunk leave, before the admit reply reaches the controller
    assert all(len(r.token_times) == 8 and r.timing.get("kv_admission", "admitted") == "admitted"
               for r in real)
    report = compare(cluster_timings(real), simulated)
    assert set(report) == {"ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms"}
    assert all(v["real"] > 0 and v["sim"] > 0 for v in report.values())

"""Smoke version of benchmarks/sim_vs_engine.py: the real in-process engine and
the simulator run the same small workload; timings are produced for every
request on both sides (the accuracy targets are checked by the benchmark)."""

from sim.engine_profile import EngineRunner, StepTimer, compare, engine_spec, sim_timings
from sim.runner import simulate
from sim.workload import WorkloadSpec, build_workload

LIMITS = {"max_num_seqs": 8, "max_num_batched_tokens": 256, "prefill_chunk_size": 128,
          "block_size": 16, "kv_cache_bytes": 4 << 20}


def test_engine_and_simulator_time_the_same_workload(tiny_model):
    wl = WorkloadSpec(arrival="poisson", rate=20.0, num_requests=6, lengths="fixed", isl=40, osl=5)
    runner = EngineRunner("tiny", LIMITS)
    real = runner.run(build_workload(wl).initial())
    simulated = sim_timings(simulate(engine_spec(LIMITS), wl))
    assert [t.request_id for t in real] == [t.request_id for t in simulated] == [f"r{i}" for i in range(6)]
    report = compare(real, simulated)
    assert set(report) == {"ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms"}
    assert all(v["real"] > 0 and v["sim"] > 0 for v in report.values())


def test_step_timer_reads_the_engines_own_plan(make_engine):
    from workers.sampling import SamplingParams
    engine = make_engine(max_num_batched_tokens=64, prefill_chunk_size=32)
    timer = StepTimer(engine)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        timer.step("k")
    shapes = [(s.num_tokens, s.prefill_chunks, s.decode_ctx_sum) for s in timer.samples]
    assert shapes == [(32, ((32, 0),), 0), (8, ((8, 32),), 0), (1, (), 41)]

"""The in-process engine profile reads each step's shape from the engine's own plan."""

from sim.engine_profile import StepTimer


def test_step_timer_reads_the_engines_own_plan(make_engine):
    from workers.sampling import SamplingParams
    engine = make_engine(max_num_batched_tokens=64, prefill_chunk_size=32)
    timer = StepTimer(engine)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        timer.step("k")
    shapes = [(s.num_tokens, s.prefill_chunks, s.decode_ctx_sum) for s in timer.samples]
    assert shapes == [(32, ((32, 0),), 0), (8, ((8, 32),), 0), (1, (), 41)]

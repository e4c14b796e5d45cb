import pytest

from sim.calibration import PARAMS, StepSample, fit_profile, predict
from sim.latency import EfficiencyProfile, load_profiles

TRUE = EfficiencyProfile("A100-80GB", 0.55, 0.8, 0.3, 0.7, 0.4, 1e-5, 3e-3, 6e-5, 2e-4, 4e-3)


def shapes():
    out = []
    for tp in (2, 4, 8):
        for p in (128, 512, 2048, 8192):
            out.append(StepSample(p, 1, 1, 0, ((p, 0),), 0.0, "prompt", tp, f"p{p}/tp{tp}"))
        for b in (1, 8, 32, 64):
            out.append(StepSample(b, b, b, b * 700, (), 0.0, "token", tp, f"b{b}/tp{tp}"))
    return out


def test_fit_recovers_a_known_profile_from_its_own_timings():
    samples = shapes()
    times = predict(samples, "llama-2-70b", "A100-80GB", "fp16", TRUE)
    measured = [StepSample(**{**s.__dict__, "seconds": float(t)}) for s, t in zip(samples, times, strict=False)]
    fitted = fit_profile(measured, "llama-2-70b", "A100-80GB", "fp16", PARAMS)
    again = predict(samples, "llama-2-70b", "A100-80GB", "fp16", fitted)
    assert again == pytest.approx(times, rel=0.02)


def test_shipped_profiles_cover_the_measured_gpus_and_cpu():
    profiles = load_profiles()
    assert {"A100-80GB", "H100-SXM", "cpu"} <= set(profiles)
    assert "Splitwise" in profiles["H100-SXM"].fitted_on

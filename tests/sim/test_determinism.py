import json

from sim.cli import main

ARGS = ["run", "--model", "llama-3.1-8b", "--mode", "disaggregated", "--prefill-gpu", "H100",
        "--decode-gpu", "A100", "--decode-replicas", "2", "--request-rate", "12",
        "--lengths", "azure-conv", "--num-requests", "300", "--seed", "5", "--json"]


def test_same_seed_gives_identical_json(capsys):
    assert main(ARGS) == 0
    first = capsys.readouterr().out
    assert main(ARGS) == 0
    second = capsys.readouterr().out
    assert first == second
    out = json.loads(first)
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert set(out[key]) == {"mean", "p50", "p90", "p99"}
    for key in ("throughput_tok_s", "goodput_req_s", "cost_per_mtok_usd"):
        assert out[key] > 0
    assert out["completed"] == 300 and out["extra"]["transfers"] == 300


def test_another_seed_gives_another_run(capsys):
    main(ARGS)
    a = json.loads(capsys.readouterr().out)
    main(ARGS[:-3] + ["--seed", "6", "--json"])
    b = json.loads(capsys.readouterr().out)
    assert a["ttft_ms"] != b["ttft_ms"]

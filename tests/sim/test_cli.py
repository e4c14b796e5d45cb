import json

import pytest

from sim.cli import main


def test_run_example_config_on_cpu(capsys):
    assert main(["run", "tiny-disagg", "--hardware", "cpu", "--request-rate", "2",
                 "--num-requests", "20", "--isl", "64", "--osl", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["extra"]["pools"] == ["prefill:prefill:cpux1x1", "decode:decode:cpux1x1"]
    assert out["extra"]["kv_blocks"] == {"prefill-0": 2048, "decode-0": 4096}  # from kv_cache_bytes
    assert out["completed"] == 20


def test_closed_loop_and_trace_flags(capsys):
    assert main(["run", "--concurrency", "4", "--num-requests", "12", "--gpu", "L40S"]) == 0
    assert "completed 12" in capsys.readouterr().out
    assert main(["run", "--trace", "azure-code", "--num-requests", "30", "--time-scale", "10",
                 "--gpu", "H100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 30


def test_bad_flags_exit_2(capsys):
    assert main(["run", "--num-requests", "5"]) == 2
    assert main(["run", "--request-rate", "1", "--gpu", "V100"]) == 2
    assert "'V100' is not in the catalog" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--request-rate", "-1"])

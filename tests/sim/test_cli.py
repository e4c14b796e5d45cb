import json
import subprocess
import sys
from pathlib import Path

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


def test_fp8_runs_on_gpus_with_and_without_fp8_tensor_cores(capsys):
    for gpu in ("H100", "A100"):  # A100: weight-only FP8 at the bf16 rate
        assert main(["run", "--dtype", "fp8", "--gpu", gpu, "--request-rate", "2",
                     "--num-requests", "10", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["extra"]["dtype"] == "fp8" and out["completed"] == 10


def test_the_simulator_does_not_import_torch():
    code = ("import sys, sim.cli, sim.runner, sim.planner, sim.calibration; "
            "sim.cli.main(['run', '--request-rate', '2', '--num-requests', '5', '--json']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip().endswith("False")

"""Helpers shared by the benchmark scripts (run as ``python benchmarks/X.py``)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path


def machine(device: str = "cpu") -> str:
    """The machine a benchmark ran on, for its report: the GPU and software on
    CUDA, else the CPU model and core count."""
    if device.startswith("cuda"):
        import torch

        try:
            import triton
            extra = f", triton {triton.__version__}"
        except ImportError:
            extra = ""
        return (f"GPU: {torch.cuda.get_device_name(torch.device(device))}, torch "
                f"{torch.__version__}, CUDA {torch.version.cuda}{extra}, {os.cpu_count()} CPU "
                f"cores, Python {platform.python_version()}")
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {os.cpu_count()} cores ({cpu}), no GPU, Python {platform.python_version()}"


def emit_report(report: dict, json_arg: str | None, print_tables: Callable[[dict], None]) -> None:
    """``--json -`` prints JSON only; ``--json FILE`` writes it and prints the tables;
    no ``--json`` prints the tables."""
    if json_arg:
        text = json.dumps(report, indent=1)
        if json_arg == "-":
            print(text)
        else:  # its folder is made first: hours of measurement must not die on a missing folder
            Path(json_arg).parent.mkdir(parents=True, exist_ok=True)
            Path(json_arg).write_text(text)
    if json_arg != "-":
        print_tables(report)

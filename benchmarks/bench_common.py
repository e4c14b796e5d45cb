"""Helpers shared by the benchmark scripts (run as ``python benchmarks/X.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def emit_report(report: dict, json_arg: str | None, print_tables: Callable[[dict], None]) -> None:
    """``--json -`` prints JSON only; ``--json FILE`` writes it and prints the tables;
    no ``--json`` prints the tables."""
    if json_arg:
        text = json.dumps(report, indent=1)
        if json_arg == "-":
            print(text)
        else:
            Path(json_arg).write_text(text)
    if json_arg != "-":
        print_tables(report)

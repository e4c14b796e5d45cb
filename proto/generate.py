"""Regenerate the Python stubs from the .proto files (``make proto``).

Lifecycle: run by hand after editing a .proto; the generated files are
committed, and a test checks that regenerating them changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))


def generate(out_dir: Path = ROOT) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTOS}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)

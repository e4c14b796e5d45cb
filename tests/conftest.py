"""Shared test fixtures. Tests run on CPU with tiny configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Triton kernels run in the interpreter on CPU; set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model():
    """The embedded tiny model, loaded once per session (read-only)."""
    from workers.loader import load_model

    return load_model("tiny")


@pytest.fixture
def make_engine(tiny_model):
    """Build an LLMEngine over the shared tiny weights with config overrides."""
    from workers.engine import EngineConfig, LLMEngine

    def build(**overrides):
        overrides.setdefault("kv_cache_bytes", 16 << 20)  # ample for tests, cheap to allocate
        # the torch path, which every machine has; tests of the C++ kernels (the
        # engine's default where they build) ask for them
        overrides.setdefault("cpu_kernels", False)
        return LLMEngine(EngineConfig(model="tiny", **overrides), loaded=tiny_model)

    return build


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port, for the whole session."""
    from cluster.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()

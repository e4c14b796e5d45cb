"""One simulated run from a spec and a workload spec: the entry point that the
CLI, the planner, the benchmarks and the tests share.

Lifecycle: ``simulate(spec, workload_spec)`` builds the workload and the
``Simulation``, runs it, and returns the ``SimResult``.
"""

from __future__ import annotations

from sim.core import SimResult, Simulation
from sim.spec import SimSpec
from sim.workload import WorkloadSpec, build_workload


def simulate(spec: SimSpec, workload: WorkloadSpec, progress: bool = False,
             profiles: dict | None = None) -> SimResult:
    return Simulation(spec, build_workload(workload), progress=progress, profiles=profiles).run()


def result_json(result: SimResult) -> dict:
    """What ``baton sim run --json`` prints (deterministic: no wall-clock time)."""
    return result.summary.to_json()

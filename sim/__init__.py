"""Baton's discrete-event cluster simulator and capacity planner.

Lifecycle of a simulation (``sim.runner.simulate``)::

    SimSpec (sim.spec: from a `baton serve` config or `baton sim run` flags)
      + WorkloadSpec (sim.workload: arrivals and lengths, or a trace)
    -> Simulation (sim.core): workers (sim.workers: the engine's own
       BatchPlanner and BlockManager; runs of decode steps fast-forwarded
       exactly by sim.decode_batch), the controller (sim.controller: the
       cluster's own scheduler, router and admission policies), KV links
       (sim.transfer), the control plane's RPC delays (sim.control),
       per-step latency (sim.latency: a roofline with factors fitted by
       sim.calibration on measured profiles)
    -> SimResult with a RunSummary (sim.metrics)

``baton sim plan`` (sim.planner) searches clusters with it; ``baton sim
calibrate`` (sim.calibration, sim.engine_profile, sim.cluster_probe) fits the
latency profiles, and measures the local cluster's link and control plane.
"""

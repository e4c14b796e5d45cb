"""GPU discovery (NVML) and placement of worker actors by GPU type.

Lifecycle: the launcher asks ``placement_options(pool)`` for each pool's Ray
actor options and checks ``missing_gpu_types`` before creating any actor, so
a pool whose GPU type no node offers fails fast. Inside a worker,
``gpu_stats()`` reads the real device through NVML when there is one.

Without GPUs the type is emulated by a Ray custom resource
``gpu_type:<T>`` that nodes advertise (``ray start --resources``); with GPUs
the same resource is advertised too (the Helm chart sets it from the node's
GPU product), so placement code is identical in tests and production.
"""

from __future__ import annotations

from dataclasses import dataclass


def gpu_resource(gpu_type: str) -> str:
    return f"gpu_type:{gpu_type}"


@dataclass(frozen=True)
class GPUStats:
    name: str  # device name as NVML reports it ("NVIDIA H100 80GB HBM3"), or "emulated:<T>"
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_ratio: float  # 0..1 over the last sample period
    power_watts: float


def placement_options(gpu_type: str, gpus_per_replica: float) -> dict:
    """Ray actor options placing a worker on a node of ``gpu_type``."""
    options: dict = {"resources": {gpu_resource(gpu_type): 1}, "num_cpus": 0}
    if gpus_per_replica > 0:
        options["num_gpus"] = gpus_per_replica
    return options


def missing_gpu_types(gpu_types: list[str], cluster_resources: dict[str, float]) -> list[str]:
    """GPU types no node of the Ray cluster offers."""
    return [t for t in dict.fromkeys(gpu_types) if cluster_resources.get(gpu_resource(t), 0) <= 0]


def gpu_stats(device_index: int = 0) -> GPUStats | None:
    """The real GPU through NVML, or None where there is no NVIDIA GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        power_mw = pynvml.nvmlDeviceGetPowerUsage(handle)
    except pynvml.NVMLError:
        return None
    return GPUStats(name.decode() if isinstance(name, bytes) else name, int(mem.total),
                    int(mem.used), util.gpu / 100.0, power_mw / 1000.0)

"""GPU catalog: published peak numbers per accelerator, keyed by name.

Lifecycle: the catalog is a constant table read at start-up; ``get_gpu(name)``
resolves a name or alias (``H100`` -> ``H100-SXM``) to a frozen ``GPUSpec``.
Efficiency factors are not stored here: they are fitted (``sim.calibration``)
and live in ``sim.latency.EfficiencyProfile``.

Sources: every number cites the public document it comes from in the comment
beside it. FLOP/s are *dense* tensor-core rates (datasheets print sparse rates
with an asterisk: those are halved here). Prices are approximate on-demand
list prices per GPU-hour and change often: override them with
``--price GPU=USD`` in ``baton sim plan``. Idle power is not published by
NVIDIA; the figures marked "estimate" are typical nvidia-smi readings of an
idle, memory-loaded GPU and should be replaced by measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator (one device; tensor parallelism multiplies it)."""

    name: str  # catalog key, e.g. "H100-SXM"
    flops: dict[str, float]  # dense FLOP/s per compute dtype ("bf16", "fp8", "fp32")
    memory_bytes: float  # device memory
    memory_bw: float  # device memory bandwidth, bytes/s
    intra_node_bw: float  # per-GPU bandwidth to its node peers (NVLink/PCIe), bytes/s, one direction
    network_bw: float  # per-GPU bandwidth off the node (NIC share), bytes/s, one direction
    idle_power_w: float  # power drawn while loaded but idle, W
    peak_power_w: float  # board power limit (TDP), W
    price_per_hour: float  # USD per GPU-hour, on demand
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field -> citation

    def peak_flops(self, dtype: str) -> float:
        """Dense FLOP/s of the GEMMs for weights stored in ``dtype``. FP8 weights on
        a GPU without FP8 tensor cores run weight-only (W8A16): dequantized to
        16-bit inside the GEMM, so at the bf16 rate (vLLM docs, "FP8 W8A8": Turing/
        Ampere run FP8 models as W8A16 with FP8 Marlin; vllm-project/vllm#5975)."""
        if dtype == "fp8" and dtype not in self.flops:
            dtype = "bf16"
        if dtype not in self.flops:
            raise ValueError(f"GPU {self.name} has no {dtype!r} tensor rate; "
                             f"supported: {', '.join(self.flops)}")
        return self.flops[dtype]


def _gpu(name, bf16, fp8, mem_gb, bw_gbs, intra_gbs, net_gbs, idle_w, peak_w, price, sources):
    flops = {"bf16": bf16 * TFLOPS, "fp16": bf16 * TFLOPS}
    if fp8:
        flops["fp8"] = fp8 * TFLOPS
    return GPUSpec(name, flops, mem_gb * GB, bw_gbs * GB, intra_gbs * GB, net_gbs * GB,
                   idle_w, peak_w, price, sources)


_DS_A10 = "NVIDIA A10 datasheet (memory, bandwidth); baseten.co 'NVIDIA A10 vs A10G' (A10G tensor rate)"
_AWS_G5 = "AWS EC2 G5 instance page: g5.xlarge up to 10 Gb/s; on-demand us-east-1 $1.006/h (2024)"

GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    _gpu("A10G", 70, None, 24, 600, 32, 1.25, 30, 300, 1.006, {
        "flops": _DS_A10, "memory": _DS_A10, "intra_node_bw": "PCIe Gen4 x16 (32 GB/s/direction)",
        "network_bw": _AWS_G5, "peak_power": "baseten.co 'NVIDIA A10 vs A10G' (300 W)",
        "idle_power": "estimate", "price": _AWS_G5}),
    _gpu("L4", 121, 242.5, 24, 300, 32, 2.5, 16, 72, 0.71, {
        "flops": "NVIDIA L4 datasheet: BF16 242 TFLOPS*, FP8 485 TFLOPS* (*sparse; halved)",
        "memory": "NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s",
        "intra_node_bw": "NVIDIA L4 datasheet: PCIe Gen4 x16 64 GB/s bidirectional",
        "network_bw": "GCP g2-standard-8: 16 Gb/s egress (estimate 20 Gb/s share)",
        "peak_power": "NVIDIA L4 datasheet: 72 W", "idle_power": "estimate",
        "price": "GCP g2-standard-4 on-demand us-central1 ~$0.71/h (2024)"}),
    _gpu("L40S", 362.05, 733, 48, 864, 32, 2.5, 35, 350, 1.861, {
        "flops": "NVIDIA L40S datasheet: BF16 362.05 TFLOPS, FP8 733 TFLOPS (dense)",
        "memory": "NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s",
        "intra_node_bw": "NVIDIA L40S datasheet: PCIe Gen4 x16 64 GB/s bidirectional",
        "network_bw": "AWS EC2 G6e: g6e.xlarge up to 20 Gb/s",
        "peak_power": "NVIDIA L40S datasheet: 350 W", "idle_power": "estimate",
        "price": "AWS EC2 g6e.xlarge on-demand us-east-1 $1.861/h (2024)"}),
    _gpu("A100-40GB", 312, None, 40, 1555, 300, 25, 50, 400, 1.29, {
        "flops": "NVIDIA A100 datasheet: BF16 312 TFLOPS (dense)",
        "memory": "NVIDIA A100 datasheet: 40 GB HBM2, 1,555 GB/s (SXM)",
        "intra_node_bw": "NVIDIA A100 datasheet: NVLink 600 GB/s (bidirectional)",
        "network_bw": "NVIDIA DGX A100 datasheet: 8x 200 Gb/s HDR InfiniBand (one per GPU)",
        "peak_power": "NVIDIA A100 datasheet: 400 W (SXM)", "idle_power": "estimate",
        "price": "Lambda on-demand list, 8x A100 40GB SXM, $1.29/GPU-h (2024)"}),
    _gpu("A100-80GB", 312, None, 80, 2039, 300, 25, 55, 400, 1.79, {
        "flops": "NVIDIA A100 datasheet: BF16 312 TFLOPS (dense)",
        "memory": "NVIDIA A100 datasheet: 80 GB HBM2e, 2,039 GB/s (SXM)",
        "intra_node_bw": "NVIDIA A100 datasheet: NVLink 600 GB/s (bidirectional)",
        "network_bw": "NVIDIA DGX A100 datasheet: 8x 200 Gb/s HDR InfiniBand (one per GPU)",
        "peak_power": "NVIDIA A100 datasheet: 400 W (SXM)", "idle_power": "estimate",
        "price": "Lambda on-demand list, 8x A100 80GB SXM, $1.79/GPU-h (2024)"}),
    _gpu("H100-SXM", 989.4, 1978.9, 80, 3350, 450, 50, 70, 700, 2.99, {
        "flops": "NVIDIA H100 datasheet (SXM): BF16 1,979 TFLOPS*, FP8 3,958 TFLOPS* (*sparse; halved)",
        "memory": "NVIDIA H100 datasheet (SXM): 80 GB HBM3, 3.35 TB/s",
        "intra_node_bw": "NVIDIA H100 datasheet: NVLink 900 GB/s (bidirectional)",
        "network_bw": "NVIDIA DGX H100 datasheet: 8x 400 Gb/s ConnectX-7 (one per GPU)",
        "peak_power": "NVIDIA H100 datasheet (SXM): up to 700 W", "idle_power": "estimate",
        "price": "Lambda on-demand list, 8x H100 SXM, $2.99/GPU-h (2024)"}),
    _gpu("H100-PCIe", 756.5, 1513, 80, 2000, 300, 25, 50, 350, 2.49, {
        "flops": "NVIDIA H100 datasheet (PCIe): BF16 1,513 TFLOPS*, FP8 3,026 TFLOPS* (*sparse; halved)",
        "memory": "NVIDIA H100 datasheet (PCIe): 80 GB HBM2e, 2 TB/s",
        "intra_node_bw": "NVIDIA H100 datasheet (PCIe): NVLink bridge 600 GB/s (bidirectional)",
        "network_bw": "estimate: 200 Gb/s NIC per GPU",
        "peak_power": "NVIDIA H100 datasheet (PCIe): 300-350 W", "idle_power": "estimate",
        "price": "Lambda on-demand list, 1x H100 PCIe, $2.49/GPU-h (2024)"}),
    _gpu("H200", 989.4, 1978.9, 141, 4800, 450, 50, 75, 700, 3.50, {
        "flops": "NVIDIA H200 datasheet (SXM): BF16 1,979 TFLOPS*, FP8 3,958 TFLOPS* (*sparse; halved)",
        "memory": "NVIDIA H200 datasheet: 141 GB HBM3e, 4.8 TB/s",
        "intra_node_bw": "NVIDIA H200 datasheet: NVLink 900 GB/s (bidirectional)",
        "network_bw": "NVIDIA HGX H200: 400 Gb/s ConnectX-7 per GPU (as DGX H100)",
        "peak_power": "NVIDIA H200 datasheet (SXM): up to 700 W", "idle_power": "estimate",
        "price": "specialty-cloud on-demand median ~$3.50/GPU-h (mercatus-ai.com survey, 2026)"}),
    _gpu("B200", 2250, 4500, 180, 8000, 900, 50, 140, 1000, 4.99, {
        "flops": "NVIDIA HGX B200 (1,000 W): BF16 4.5 PFLOPS*, FP8 9 PFLOPS* (*sparse; halved)",
        "memory": "NVIDIA DGX B200 datasheet: 1,440 GB HBM3e per 8 GPUs (180 GB), 8 TB/s per GPU",
        "intra_node_bw": "NVIDIA Blackwell datasheet: NVLink 5 1.8 TB/s (bidirectional)",
        "network_bw": "NVIDIA DGX B200 datasheet: 8x 400 Gb/s ConnectX-7",
        "peak_power": "NVIDIA HGX B200: 1,000 W per GPU", "idle_power": "estimate",
        "price": "Lambda on-demand list, 8x B200, $4.99/GPU-h (2025)"}),
    GPUSpec("cpu", {"fp32": 100e9, "bf16": 100e9}, 16 * GB, 10 * GB, 10 * GB, 10 * GB,
            10, 65, 0.08, {
                "all": "this machine (2 cores): nominal figures; `baton sim calibrate` measures "
                       "matmul FLOP/s and copy bandwidth and fits the efficiencies",
                "price": "AWS c6a.large on-demand (2 vCPU) $0.0765/h, rounded"}),
)}

ALIASES = {"H100": "H100-SXM", "A100": "A100-80GB", "A100-80G": "A100-80GB",
           "A100-40G": "A100-40GB", "H200-SXM": "H200", "CPU": "cpu"}


def gpu_names() -> list[str]:
    return list(GPUS)


def canonical_gpu_name(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in GPUS:
        raise ValueError(f"GPU type {name!r} is not in the catalog; known: "
                         f"{', '.join(GPUS)} (aliases: {', '.join(ALIASES)})")
    return key


def get_gpu(name: str, price_overrides: dict[str, float] | None = None) -> GPUSpec:
    """The catalog entry for ``name`` (or an alias), with an optional price override."""
    gpu = GPUS[canonical_gpu_name(name)]
    price = (price_overrides or {}).get(gpu.name)
    if price is None:
        return gpu
    if price < 0:
        raise ValueError(f"price for {gpu.name} must be >= 0, got {price}")
    from dataclasses import replace
    return replace(gpu, price_per_hour=price)

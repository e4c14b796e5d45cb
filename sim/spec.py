"""What to simulate: the cluster, the model and the run options.

Lifecycle: a ``SimSpec`` is built once, either from a ``baton serve`` config
(``spec_from_cluster_config``, the same YAML ``cluster.config.load_config``
reads) or from ``baton sim run`` flags (``cluster_config_from_flags`` writes a
``ClusterConfig`` first, so both paths meet), validated, then handed to
``sim.core.Simulation``.

KV capacity per pool: ``kv_from="memory"`` sizes it from the GPU's memory
beside the weights (vLLM's rule); ``kv_from="config"`` uses the pool's
``kv_cache_bytes`` (what the real CPU cluster allocates). ``hardware``
replaces every pool's GPU type (``cpu`` compares the simulator with the real
cluster emulating GPU types on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config import (
    AdmissionSpec,
    ClusterConfig,
    ModelSpec,
    PoolSpec,
    RouterSpec,
    SchedulerSpec,
)
from sim.control import ControlPlane
from sim.hardware import canonical_gpu_name
from sim.latency import sim_dtype
from sim.metrics import SLO

KV_SOURCES = ("memory", "config")


@dataclass(frozen=True)
class SimPool:
    """One pool as simulated."""

    name: str  # pool name from the config
    role: str  # prefill | decode | mixed
    gpu_type: str  # catalog name (aliases resolved)
    replicas: int
    tensor_parallel: int
    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_chunk_size: int
    block_size: int
    kv_cache_bytes: int  # used when kv_from == "config"


@dataclass(frozen=True)
class SimSpec:
    model: str  # catalog name, preset, or config.json path
    dtype: str  # bf16 | fp8 | fp16 | fp32
    pools: tuple[SimPool, ...]
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    router: str = "least-loaded"
    max_waiting: int = 1024  # admission bound
    slo: SLO = field(default_factory=SLO)
    kv_from: str = "memory"  # memory | config
    memory_utilization: float = 0.9  # share of GPU memory for weights + KV (kv_from=memory)
    link_bandwidth: float | None = None  # bytes/s per NIC; None = the GPU's network bandwidth x TP
    link_latency_s: float = 50e-6  # fixed cost per KV transfer
    control: ControlPlane = field(default_factory=ControlPlane)  # RPC delays (sim.control)
    prefill_step_noise: tuple[float, ...] = ()  # measured/modelled prefill step times to draw
    #   from per step (a shared machine's interference; sim.control); empty: none
    prefix_caching: bool = False  # BlockManager prefix reuse (Mooncake hash ids)
    fast_forward: bool = True  # decode windows (exact; see sim.workers)
    ranker_noise: float = 0.5  # std-dev of the simulated ranker's log-length error (ltr)
    ranker_prompt_s: float = 0.0  # scoring time per prompt (sim.ranker); 0: scored on arrival
    ranker_chunk: int = 16  # prompts per encoder call (the controller's RankerService.chunk)
    ranker_max_batch: int = 64  # prompts taken from the ranker's queue at once
    seed: int = 0
    prices: dict[str, float] = field(default_factory=dict)  # GPU type -> USD/h overrides

    def __post_init__(self) -> None:
        if not self.pools:
            raise ValueError("a simulation needs at least one pool")
        roles = {p.role for p in self.pools}
        if roles not in ({"mixed"}, {"prefill", "decode"}):
            raise ValueError(f"pools must be all 'mixed' or both 'prefill' and 'decode', got {sorted(roles)}")
        if self.kv_from not in KV_SOURCES:
            raise ValueError(f"kv_from {self.kv_from!r} is unknown; allowed: {', '.join(KV_SOURCES)}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization {self.memory_utilization} must be in (0, 1]")
        if self.link_bandwidth is not None and self.link_bandwidth <= 0:
            raise ValueError(f"link_bandwidth {self.link_bandwidth} must be > 0")
        if self.ranker_prompt_s < 0 or self.ranker_chunk <= 0 or self.ranker_max_batch <= 0:
            raise ValueError(f"ranker_prompt_s={self.ranker_prompt_s} must be >= 0, ranker_chunk="
                             f"{self.ranker_chunk} and ranker_max_batch={self.ranker_max_batch} > 0")
        for p in self.pools:
            if p.replicas <= 0:
                raise ValueError(f"pool {p.name}: replicas={p.replicas} must be > 0 to simulate")

    @property
    def disaggregated(self) -> bool:
        return any(p.role == "prefill" for p in self.pools)


def spec_from_cluster_config(cfg: ClusterConfig, *, dtype: str | None = None,
                             hardware: str | None = None, kv_from: str | None = None,
                             **options) -> SimSpec:
    """The simulation of a ``baton serve`` config. ``hardware`` replaces every
    pool's GPU type; ``kv_from`` defaults to ``config`` on cpu, else ``memory``."""
    pools = tuple(_pool(p, hardware) for p in cfg.pools if p.replicas > 0)
    on_cpu = all(p.gpu_type == "cpu" for p in pools)
    fields = dict(model=cfg.model.source, dtype=sim_dtype(dtype or cfg.model.dtype), pools=pools,
                  scheduler=cfg.scheduler, router=cfg.router.policy,
                  max_waiting=cfg.admission.max_waiting,
                  slo=SLO(cfg.slo.ttft_ms, cfg.slo.tpot_ms, cfg.slo.attainment),
                  kv_from=kv_from or ("config" if on_cpu else "memory"))
    return SimSpec(**{**fields, **options})


def _pool(p: PoolSpec, hardware: str | None) -> SimPool:
    return SimPool(p.name, p.role, canonical_gpu_name(hardware or p.gpu_type), p.replicas,
                   p.tensor_parallel, p.max_num_seqs, p.max_num_batched_tokens,
                   p.prefill_chunk_size, p.block_size, p.kv_cache_bytes)


@dataclass(frozen=True)
class PoolFlags:
    """One pool as given on the command line."""

    gpu: str
    tp: int
    replicas: int


def cluster_config_from_flags(model: str, dtype: str, mode: str, mixed: PoolFlags | None,
                              prefill: PoolFlags | None, decode: PoolFlags | None,
                              scheduler: str = "fcfs", router: str = "least-loaded",
                              max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                              prefill_chunk_size: int = 8192, block_size: int = 16,
                              max_waiting: int = 1024, name: str = "sim") -> ClusterConfig:
    """The ``baton serve`` config equivalent to ``baton sim run`` flags."""
    def pool(pname: str, role: str, f: PoolFlags) -> PoolSpec:
        return PoolSpec(name=pname, role=role, gpu_type=canonical_gpu_name(f.gpu),
                        replicas=f.replicas, tensor_parallel=f.tp, gpus_per_replica=f.tp,
                        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                        prefill_chunk_size=prefill_chunk_size, block_size=block_size)

    if mode == "colocated":
        pools = (pool("mixed", "mixed", mixed),)
    elif mode == "disaggregated":
        pools = (pool("prefill", "prefill", prefill), pool("decode", "decode", decode))
    else:
        raise ValueError(f"mode {mode!r} is unknown; allowed: colocated, disaggregated")
    cfg_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, "bfloat16")
    cfg = ClusterConfig(name=name, model=ModelSpec(source=model, dtype=cfg_dtype), pools=pools,
                        scheduler=SchedulerSpec(policy=scheduler), router=RouterSpec(policy=router),
                        admission=AdmissionSpec(max_waiting=max_waiting))
    return ClusterConfig.from_dict(cfg.to_dict())  # the config's own validation

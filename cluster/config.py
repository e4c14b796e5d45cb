"""Cluster configuration: YAML in, validated dataclasses out.

Lifecycle: ``load_config(path)`` (or ``ClusterConfig.from_dict``) runs once at
start-up in ``baton serve``, ``baton demo``, the simulator and the Helm chart's
tests. Every error names the key path, the bad value and what is allowed;
nothing is read from the environment here (the API token is named by the
variable that holds it, never stored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ROLES = ("prefill", "decode", "mixed")
TRANSPORTS = ("grpc", "nccl")
DTYPES = ("float32", "float16", "bfloat16")
SCHEDULERS = ("fcfs", "sjf-oracle", "ltr")
ROUTERS = ("round-robin", "least-loaded", "prefix-aware")
EXAMPLES = ("tiny-disagg", "tiny-2p2d", "tiny-colocated")
SCALERS = ("queue-depth",)


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ModelSpec:
    source: str = "tiny"  # preset name or local Hugging Face directory
    dtype: str = "float32"
    max_model_len: int | None = None  # None = the model's own limit
    name: str | None = None  # the served model name clients send; None = source

    @property
    def served_name(self) -> str:
        return self.name or self.source


@dataclass(frozen=True)
class AutoscaleSpec:
    """Baton scaling a pool's replicas on its queue depth (cluster/autoscaler.py,
    policy cluster/policies/scaling.py). The pool's ``replicas`` is then the
    count at start."""

    max_replicas: int  # most replicas (Ray worker actors) of the pool
    min_replicas: int = 1  # fewest replicas
    policy: str = "queue-depth"
    target_waiting_per_replica: float = 4.0  # requests no replica can take, per replica
    target_kv_usage: float = 0.8  # mean fraction of the pool's KV blocks in use
    upscale_delay_s: float = 5.0  # a scale-up must be wanted this long (and since the last event)
    downscale_delay_s: float = 120.0  # likewise for a scale-down
    max_step: int = 1  # replicas added or removed by one decision
    interval_s: float = 2.0  # how often the autoscaler reads the pool's load
    pending_timeout_s: float = 900.0  # a new replica not placed by then is given up
    drain_timeout_s: float = 120.0  # a retiring replica's requests may finish for this long,
    # then the rest are re-queued and re-prefilled elsewhere


@dataclass(frozen=True)
class PoolSpec:
    name: str
    role: str  # prefill | decode | mixed
    gpu_type: str  # e.g. H100, L40S; emulated by a Ray resource without GPUs
    replicas: int = 1
    tensor_parallel: int = 1
    gpus_per_replica: float = 0  # 0 on CPU; Ray num_gpus per worker otherwise
    max_num_batched_tokens: int = 2048  # prefill token budget per step
    max_num_seqs: int = 64
    prefill_chunk_size: int = 512
    kv_cache_bytes: int = 256 << 20
    block_size: int = 16
    # The C++ kernels of kernels.cpu_kernels for decode attention and RMSNorm
    # (EngineConfig.cpu_kernels; built on each machine on first use, ~15 s). Unset: on
    # where they apply (a CPU pool, model.dtype float32) and build, else torch; true:
    # the same, and a pool where they cannot apply is a config error; false: torch
    cpu_kernels: bool | None = None
    autoscale: AutoscaleSpec | None = None  # None = a fixed number of replicas


@dataclass(frozen=True)
class SchedulerSpec:
    policy: str = "fcfs"
    starvation_rounds: int = 200  # rounds passed over before promotion
    quantum_rounds: int = 10  # rounds a promoted request keeps its boost
    max_wait_s: float | None = None  # wall-clock bound on waiting, None = off
    score_wait_s: float = 1.0  # ltr: longest wait for the ranker's score before dispatch


@dataclass(frozen=True)
class RouterSpec:
    policy: str = "least-loaded"


@dataclass(frozen=True)
class AdmissionSpec:
    max_waiting: int = 1024  # requests queued at the controller before "overloaded"


@dataclass(frozen=True)
class RedisSpec:
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "baton"  # key prefix, one per cluster
    password_env: str | None = None  # variable holding the password, if any


@dataclass(frozen=True)
class RankerSpec:
    """The learned output-length ranker (cluster/ranker), loaded by the
    controller when ``scheduler.policy`` is ``ltr`` or logging is on."""

    head_path: str | None = None  # trained head (.safetensors); None = the one shipped
    max_batch: int = 64  # prompts taken from the arrival queue at once
    chunk: int = 16  # prompts per encoder call (scores are released chunk by chunk)
    precision: str = "int8"  # encoder arithmetic: int8 (serving default) | bf16 | fp32 (reference)
    num_threads: int = 1  # torch threads of the controller process for the encoder
    log_completions: bool = False  # opt-in: log finished requests to Redis for retraining
    log_prompts: str = "features"  # features (hash + embedding) | redacted (masked text)
    log_cap: int = 50_000  # completions kept in Redis (oldest dropped)
    tau_window: int = 500  # recent completions behind the baton_ranker_kendall_tau gauge


@dataclass(frozen=True)
class SLOSpec:
    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0
    attainment: float = 0.9


@dataclass(frozen=True)
class ServerSpec:
    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8000
    auth_token_env: str | None = None  # variable holding the bearer token; None = auth off
    max_message_bytes: int = 16 << 20


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "baton"
    model: ModelSpec = field(default_factory=ModelSpec)
    pools: tuple[PoolSpec, ...] = ()
    transport: str = "grpc"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    router: RouterSpec = field(default_factory=RouterSpec)
    admission: AdmissionSpec = field(default_factory=AdmissionSpec)
    redis: RedisSpec = field(default_factory=RedisSpec)
    slo: SLOSpec = field(default_factory=SLOSpec)
    server: ServerSpec = field(default_factory=ServerSpec)
    ranker: RankerSpec = field(default_factory=RankerSpec)

    @property
    def disaggregated(self) -> bool:
        return any(p.role == "prefill" for p in self.pools)

    def pools_with_role(self, role: str) -> list[PoolSpec]:
        return [p for p in self.pools if p.role == role]

    @classmethod
    def from_dict(cls, data: Any) -> ClusterConfig:
        cfg = _build(cls, data, "")
        _validate(cfg)
        return cfg

    def to_dict(self) -> dict:
        return _to_dict(self)


def load_config(source: str | Path) -> ClusterConfig:
    """A YAML file path, or the name of a shipped example (``tiny-disagg``)."""
    text = _example_text(str(source)) if str(source) in EXAMPLES else _read(Path(source))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return ClusterConfig.from_dict(data)


def _read(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; examples: {', '.join(EXAMPLES)}")
    return path.read_text()


def _example_text(name: str) -> str:
    return resources.files("cluster").joinpath("examples", f"{name}.yaml").read_text()


# ----- building dataclasses from plain data ---------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_NESTED = {"model": ModelSpec, "scheduler": SchedulerSpec, "router": RouterSpec,
           "admission": AdmissionSpec, "redis": RedisSpec, "slo": SLOSpec, "server": ServerSpec,
           "ranker": RankerSpec}


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key; allowed: {', '.join(known)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(cls, key, value, _join(path, key))
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = str(exc).split("argument")[-1].strip(": '")
        raise ConfigError(f"{_join(path, missing)}: required key is missing") from None


def _convert(cls, key: str, value: Any, path: str):
    if cls is ClusterConfig and key in _NESTED:
        return _build(_NESTED[key], value, path)
    if cls is ClusterConfig and key == "pools":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}: must be a non-empty list of pools")
        return tuple(_build(PoolSpec, p, f"{path}[{i}]") for i, p in enumerate(value))
    if cls is PoolSpec and key == "autoscale":
        return None if value is None else _build(AutoscaleSpec, value, path)
    if key.endswith("_bytes"):
        return _parse_size(value, path)
    expected = {f.name: f.type for f in fields(cls)}[key]
    return _check_type(value, expected, path)


def _check_type(value: Any, expected: str, path: str):
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool}
    base = expected.replace(" | None", "")
    if value is None:
        if "None" in expected:
            return None
        raise ConfigError(f"{path}: must not be null")
    want = kinds.get(base)
    if want is None:
        return value
    if isinstance(value, bool) and base != "bool" or not isinstance(value, want):
        allowed = "bool (true or false)" if base == "bool" else base
        raise ConfigError(f"{path}: expected {allowed}, got {value!r}")
    return float(value) if base == "float" else value


def _parse_size(value: Any, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"{path}: {value!r} is not a size (e.g. 268435456, 256MiB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ----- semantic checks --------------------------------------------------------
def _validate(cfg: ClusterConfig) -> None:
    _one_of("model.dtype", cfg.model.dtype, DTYPES)
    _one_of("transport", cfg.transport, TRANSPORTS)
    _one_of("scheduler.policy", cfg.scheduler.policy, SCHEDULERS)
    _one_of("router.policy", cfg.router.policy, ROUTERS)
    if not cfg.pools:
        raise ConfigError("pools: at least one pool is required")
    names = [p.name for p in cfg.pools]
    if len(set(names)) != len(names):
        raise ConfigError(f"pools: names must be unique, got {names}")
    for i, pool in enumerate(cfg.pools):
        _validate_pool(pool, f"pools[{i}]")
        _validate_cpu_kernels(pool, f"pools[{i}]", cfg.model.dtype)
    roles = {p.role for p in cfg.pools}
    if "mixed" in roles and roles != {"mixed"}:
        raise ConfigError("pools: a 'mixed' pool cannot be combined with prefill/decode pools")
    if roles & {"prefill", "decode"} and roles != {"prefill", "decode"}:
        raise ConfigError(
            f"pools: a disaggregated cluster needs both a prefill and a decode pool, got {sorted(roles)}")
    _positive("admission.max_waiting", cfg.admission.max_waiting)
    _positive("scheduler.starvation_rounds", cfg.scheduler.starvation_rounds)
    _positive("scheduler.quantum_rounds", cfg.scheduler.quantum_rounds)
    if cfg.scheduler.max_wait_s is not None:
        _positive("scheduler.max_wait_s", cfg.scheduler.max_wait_s)
    if cfg.scheduler.score_wait_s < 0:
        raise ConfigError(f"scheduler.score_wait_s: {cfg.scheduler.score_wait_s} must be >= 0")
    _one_of("ranker.log_prompts", cfg.ranker.log_prompts, ("features", "redacted"))
    _one_of("ranker.precision", cfg.ranker.precision, ("int8", "bf16", "fp32"))
    for key in ("max_batch", "chunk", "num_threads", "log_cap"):
        _positive(f"ranker.{key}", getattr(cfg.ranker, key))
    if cfg.ranker.tau_window < 2:
        raise ConfigError(f"ranker.tau_window: {cfg.ranker.tau_window} must be >= 2")
    if not 0 < cfg.slo.attainment <= 1:
        raise ConfigError(f"slo.attainment: {cfg.slo.attainment} must be in (0, 1]")
    for key in ("grpc_port", "http_port"):
        port = getattr(cfg.server, key)
        if not 0 <= port <= 65535:
            raise ConfigError(f"server.{key}: {port} must be in [0, 65535]")
    if not cfg.redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"redis.url: {cfg.redis.url!r} must start with redis://, rediss:// or unix://")
    env = cfg.redis.password_env
    if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
        raise ConfigError(f"redis.password_env: {env!r} is not an environment variable name "
                          "(letters, digits, '_'; not starting with a digit)")


def _validate_pool(pool: PoolSpec, path: str) -> None:
    _one_of(f"{path}.role", pool.role, ROLES)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", pool.gpu_type):
        raise ConfigError(f"{path}.gpu_type: {pool.gpu_type!r} must be letters, digits, '-', '_', '.'")
    if pool.replicas < 0:
        raise ConfigError(f"{path}.replicas: {pool.replicas} must be >= 0")
    for key in ("tensor_parallel", "max_num_batched_tokens", "max_num_seqs",
                "prefill_chunk_size", "kv_cache_bytes"):
        _positive(f"{path}.{key}", getattr(pool, key))
    if pool.block_size <= 0 or pool.block_size & (pool.block_size - 1):
        raise ConfigError(f"{path}.block_size: {pool.block_size} must be a power of two")
    if pool.gpus_per_replica < 0:
        raise ConfigError(f"{path}.gpus_per_replica: {pool.gpus_per_replica} must be >= 0")
    if pool.autoscale is not None:
        _validate_autoscale(pool, f"{path}.autoscale")


def _validate_cpu_kernels(pool: PoolSpec, path: str, dtype: str) -> None:
    """The C++ kernels are float32 CPU code: asked for elsewhere, a worker would
    silently run torch, so the config says so instead."""
    if not pool.cpu_kernels:
        return
    if pool.gpus_per_replica > 0:
        raise ConfigError(f"{path}.cpu_kernels: true needs a CPU pool (gpus_per_replica: 0), "
                          f"got gpus_per_replica: {pool.gpus_per_replica:g}")
    if dtype != "float32":
        raise ConfigError(f"{path}.cpu_kernels: true needs model.dtype float32, got {dtype!r}")


def _validate_autoscale(pool: PoolSpec, path: str) -> None:
    a = pool.autoscale
    if pool.role == "prefill":
        raise ConfigError(f"{path}: pool role {pool.role!r} cannot be autoscaled; "
                          "allowed roles: decode, mixed")
    _one_of(f"{path}.policy", a.policy, SCALERS)
    if a.min_replicas < 0:
        raise ConfigError(f"{path}.min_replicas: {a.min_replicas} must be >= 0")
    if a.max_replicas < max(1, a.min_replicas):
        raise ConfigError(f"{path}.max_replicas: {a.max_replicas} must be >= 1 and >= "
                          f"min_replicas ({a.min_replicas})")
    if not a.min_replicas <= pool.replicas <= a.max_replicas:
        raise ConfigError(f"{path}: replicas ({pool.replicas}, the count at start) must be in "
                          f"[min_replicas, max_replicas] = [{a.min_replicas}, {a.max_replicas}]")
    if not 0 < a.target_kv_usage <= 1:
        raise ConfigError(f"{path}.target_kv_usage: {a.target_kv_usage} must be in (0, 1]")
    for key in ("target_waiting_per_replica", "max_step", "interval_s", "pending_timeout_s"):
        _positive(f"{path}.{key}", getattr(a, key))
    for key in ("upscale_delay_s", "downscale_delay_s", "drain_timeout_s"):
        if getattr(a, key) < 0:
            raise ConfigError(f"{path}.{key}: {getattr(a, key)} must be >= 0")


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: {value} must be > 0")


def _to_dict(obj) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_dict(x) for x in obj]
    return obj

"""Per-iteration latency: a roofline over the operators of one batch.

Lifecycle: a ``LatencyModel`` is built once per worker from (model, GPU, TP,
dtype, efficiency profile); it precomputes per-layer constants, then
``step_time`` is called for every simulated engine step with the step's
shape: how many tokens, sequences and sampled rows, the decode sequences'
total KV length, and each prefill chunk's (new tokens, cached tokens).

Operators of one step, per layer, on one tensor-parallel shard::

    linear   QKV, O, gate+up, down       max(FLOPs / (peak * e_mm), bytes / (bw * e_mem))
    attn     decode: per request its own KV length; prefill: per chunk its own
             (new x cached + new^2 / 2) score matrix
                                          max(FLOPs / (peak * e_attn), KV bytes / (bw * e_kv))
    elem     norms, rope, residual, activation (memory bound)
    comm     2 all-reduces of the hidden states when TP > 1 (ring)
             2 (tp-1) * step latency + 2 (tp-1)/tp * bytes / (intra-node bw * e_ar)
    + per-layer, per-sequence and per-step overheads, and the LM head on the
      sampled rows.

Efficiency factors and overheads come from an ``EfficiencyProfile`` fitted on
measured profiles (``sim.calibration``), following the operator-level
approach of Vidur (Agrawal et al., MLSys 2024), with a roofline in place of
Vidur's learned per-operator regressors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sim.hardware import GPUSpec
from workers.model_config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                 "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8_e4m3": "fp8"}
PROFILES_PATH = Path(__file__).with_name("data") / "profiles.json"


def sim_dtype(name: str) -> str:
    """``bf16`` from ``bf16`` or from a config name such as ``bfloat16``."""
    key = CONFIG_DTYPES.get(name, name)
    if key not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r} is unknown; allowed: {', '.join(DTYPE_BYTES)}")
    return key


@dataclass(frozen=True)
class EfficiencyProfile:
    """Fitted fractions of peak and fixed costs for one accelerator type."""

    name: str  # the GPU type it was fitted for
    matmul_compute: float  # fraction of peak FLOP/s a GEMM reaches
    matmul_memory: float  # fraction of memory bandwidth weight/activation streaming reaches
    attn_compute: float  # fraction of peak FLOP/s prefill attention reaches
    attn_memory: float  # fraction of memory bandwidth decode attention (KV reads) reaches
    allreduce: float  # fraction of intra-node bandwidth an all-reduce reaches
    allreduce_latency_s: float  # latency of one ring step of an all-reduce (2 (tp-1) steps a call)
    step_overhead_s: float  # fixed cost of one engine step (schedule, sample, launch)
    layer_overhead_s: float  # fixed cost per layer per step (kernel launches)
    seq_overhead_s: float  # cost per sequence in the batch per step
    prefill_seq_overhead_s: float = 0.0  # extra cost per prefill chunk (input prep, new block tables)
    fitted_on: str = ""  # where the numbers come from


def load_profiles(path: Path = PROFILES_PATH) -> dict[str, EfficiencyProfile]:
    data = json.loads(path.read_text())
    keys = {f.name for f in fields(EfficiencyProfile)}
    return {name: EfficiencyProfile(**{k: v for k, v in p.items() if k in keys})
            for name, p in data["profiles"].items()}


def save_profile(profile: EfficiencyProfile, path: Path = PROFILES_PATH,
                 extra: dict | None = None) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"profiles": {}, "reports": {}}
    data["profiles"][profile.name] = asdict(profile)
    if extra is not None:
        data.setdefault("reports", {})[profile.name] = extra
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# GPU types without measured profiles borrow the factors of the nearest measured one.
PROFILE_FALLBACK = {"H100-SXM": "H100-SXM", "H100-PCIe": "H100-SXM", "H200": "H100-SXM",
                    "B200": "H100-SXM", "A100-80GB": "A100-80GB", "A100-40GB": "A100-80GB",
                    "A10G": "A100-80GB", "L4": "A100-80GB", "L40S": "A100-80GB", "cpu": "cpu"}


def profile_for(gpu_name: str, profiles: dict[str, EfficiencyProfile] | None = None
                ) -> EfficiencyProfile:
    profiles = profiles if profiles is not None else load_profiles()
    key = gpu_name if gpu_name in profiles else PROFILE_FALLBACK.get(gpu_name)
    if key not in profiles:
        raise ValueError(f"no efficiency profile for GPU {gpu_name!r}; have: {', '.join(profiles)}"
                         " (run `baton sim calibrate` for cpu)")
    return profiles[key]


@dataclass(frozen=True)
class OpCosts:
    """Per-layer constants of one (model, TP, dtype), per tensor-parallel shard."""

    linear_flops_per_token: float  # GEMM FLOPs of one token through one layer
    linear_weight_bytes: float  # weight bytes of one layer's GEMMs
    linear_act_bytes_per_token: float  # activation bytes in/out of those GEMMs
    elem_bytes_per_token: float  # norm/rope/residual/activation traffic
    attn_flops_per_pair: float  # FLOPs per (query, key) pair: QK^T and PV
    kv_bytes_per_token: float  # KV bytes read per cached token per layer
    q_bytes_per_token: float  # query + output bytes per new token per layer
    allreduce_bytes_per_token: float  # hidden-state bytes reduced per token per call
    head_flops_per_row: float  # LM head FLOPs per sampled row
    head_weight_bytes: float  # LM head weight bytes
    head_act_bytes_per_row: float  # LM head activation bytes per row


def op_costs(m: ModelConfig, tp: int, dtype: str) -> OpCosts:
    w = DTYPE_BYTES[dtype]
    act = 4 if dtype == "fp32" else 2  # activations stay 16-bit under fp8 weights
    d, f, hd = m.hidden_size, m.intermediate_size, m.head_dim
    q = m.num_heads * hd / tp
    kv = max(m.num_kv_heads / tp, 1) * hd  # KV heads are replicated when tp > kv heads
    n_params = d * (q + 2 * kv) + q * d + 3 * d * f / tp
    return OpCosts(
        linear_flops_per_token=2 * n_params,
        linear_weight_bytes=n_params * w,
        linear_act_bytes_per_token=(d + q + 2 * kv + q + d + d + 2 * f / tp + f / tp + d) * act,
        elem_bytes_per_token=(10 * d + 3 * f / tp + 2 * (q + kv)) * act,
        attn_flops_per_pair=4 * q,
        kv_bytes_per_token=2 * kv * w,
        q_bytes_per_token=2 * q * act,
        allreduce_bytes_per_token=d * act,
        head_flops_per_row=2 * d * m.vocab_size / tp,
        head_weight_bytes=d * m.vocab_size / tp * w,
        head_act_bytes_per_row=(d + m.vocab_size / tp) * act,
    )


class LatencyModel:
    """Seconds per engine step for one worker (one replica of TP GPUs)."""

    def __init__(self, model: ModelConfig, gpu: GPUSpec, tp: int, dtype: str,
                 profile: EfficiencyProfile):
        if tp < 1:
            raise ValueError(f"tensor_parallel={tp} must be >= 1")
        self.model, self.gpu, self.tp, self.dtype, self.profile = model, gpu, tp, dtype, profile
        self.ops = op_costs(model, tp, dtype)
        e = profile
        self.layers = model.num_layers
        self._flop_rate = gpu.peak_flops(dtype) * e.matmul_compute
        self._mem_rate = gpu.memory_bw * e.matmul_memory
        self._attn_flop_rate = gpu.peak_flops(dtype) * e.attn_compute
        self._kv_rate = gpu.memory_bw * e.attn_memory
        self._ar_calls = 0 if tp == 1 else 2
        self._ar_rate = gpu.intra_node_bw * e.allreduce * tp / (2 * (tp - 1)) if tp > 1 else 1.0
        self._ar_latency = 2 * (tp - 1) * e.allreduce_latency_s  # ring all-reduce
        self._decode_lines: dict[int, tuple[float, float]] = {}

    def step_time(self, num_tokens: int, num_seqs: int, logit_rows: int, decode_ctx_sum: int,
                  prefill_chunks: tuple[tuple[int, int], ...] | list = ()) -> float:
        """One step: ``decode_ctx_sum`` = total KV length (incl. the new token) of its
        decode sequences; ``prefill_chunks`` = (new tokens, cached tokens) per chunk."""
        o, e = self.ops, self.profile
        flop_rate, mem_rate, attn_rate, kv_rate = (self._flop_rate, self._mem_rate,
                                                   self._attn_flop_rate, self._kv_rate)
        linear = max(num_tokens * o.linear_flops_per_token / flop_rate,
                     (o.linear_weight_bytes + num_tokens * o.linear_act_bytes_per_token)
                     / mem_rate)
        elem = num_tokens * o.elem_bytes_per_token / mem_rate
        # attention: decode sequences by their total KV length, each prefill chunk by
        # its (new x cached + new^2 / 2) scores (written out: a step each)
        attn = max(decode_ctx_sum * o.attn_flops_per_pair / attn_rate,
                   decode_ctx_sum * o.kv_bytes_per_token / kv_rate)
        for new, cached in prefill_chunks:
            pairs = new * cached + new * (new + 1) / 2
            attn += max(pairs * o.attn_flops_per_pair / attn_rate,
                        ((cached + new) * o.kv_bytes_per_token + new * o.q_bytes_per_token)
                        / kv_rate)
        layer = linear + elem + attn
        if self._ar_calls:  # the all-reduces (TP > 1; nothing to add otherwise)
            layer += self._ar_calls * (self._ar_latency
                                       + num_tokens * o.allreduce_bytes_per_token / self._ar_rate)
        layer += e.layer_overhead_s
        head = max(logit_rows * o.head_flops_per_row / flop_rate,
                   (o.head_weight_bytes + logit_rows * o.head_act_bytes_per_row) / mem_rate)
        return (e.step_overhead_s + num_seqs * e.seq_overhead_s
                + len(prefill_chunks) * e.prefill_seq_overhead_s + self.layers * layer + head)

    def decode_line(self, num_seqs: int) -> tuple[float, float]:
        """``(fixed_s, per_kv_token_s)``: a step of ``num_seqs`` decodes whose total
        KV length is L lasts ``fixed_s + per_kv_token_s * L`` (``step_time``, up to
        rounding: only decode attention depends on L, and linearly)."""
        line = self._decode_lines.get(num_seqs)
        if line is None:
            line = (self.step_time(num_seqs, num_seqs, num_seqs, 0),
                    self.layers * self._decode_attention(1))
            self._decode_lines[num_seqs] = line
        return line

    def _decode_attention(self, ctx_sum: int) -> float:
        o = self.ops
        return max(ctx_sum * o.attn_flops_per_pair / self._attn_flop_rate,
                   ctx_sum * o.kv_bytes_per_token / self._kv_rate)

    def decode_flops(self, num_tokens: int, decode_ctx_sum: int) -> float:
        """``model_flops`` of decode steps alone (no prefill chunk)."""
        o = self.ops
        return self.layers * (num_tokens * o.linear_flops_per_token
                              + decode_ctx_sum * o.attn_flops_per_pair)

    def model_flops(self, num_tokens: int, decode_ctx_sum: int,
                    prefill_chunks: tuple[tuple[int, int], ...] | list = ()) -> float:
        """Useful FLOPs of a step on one shard (for utilisation), LM head excluded."""
        o = self.ops
        pairs = decode_ctx_sum
        if prefill_chunks:
            if len(prefill_chunks) == 1:  # the usual step: no generator
                n, c = prefill_chunks[0]
                pairs += n * c + n * (n + 1) / 2
            else:
                pairs += sum(n * c + n * (n + 1) / 2 for n, c in prefill_chunks)
        return self.layers * (num_tokens * o.linear_flops_per_token + pairs * o.attn_flops_per_pair)


def weight_bytes_per_gpu(model: ModelConfig, tp: int, dtype: str) -> float:
    return model.num_parameters() * DTYPE_BYTES[dtype] / tp


def kv_bytes_per_token(model: ModelConfig, tp: int, dtype: str) -> int:
    """KV bytes of one token on the whole replica (replicated heads counted)."""
    kv_heads = max(model.num_kv_heads, tp)
    return 2 * model.num_layers * kv_heads * model.head_dim * DTYPE_BYTES[dtype]


def kv_blocks_from_memory(model: ModelConfig, gpu: GPUSpec, tp: int, dtype: str,
                          block_size: int, memory_utilization: float = 0.9,
                          activation_reserve_bytes: float = 2e9) -> int:
    """KV blocks that fit beside the weights (vLLM's ``gpu_memory_utilization`` rule)."""
    free = (gpu.memory_bytes * memory_utilization - weight_bytes_per_gpu(model, tp, dtype)
            - activation_reserve_bytes) * tp
    blocks = int(free // (kv_bytes_per_token(model, tp, dtype) * block_size))
    if blocks <= 0:
        raise ValueError(f"model does not fit: {weight_bytes_per_gpu(model, tp, dtype) / 1e9:.1f} GB "
                         f"of weights per GPU on {gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB) "
                         f"at tp={tp}, dtype={dtype}")
    return blocks

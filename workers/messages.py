"""Plain dataclasses crossing the controller <-> worker boundary.

Lifecycle: built by one side of a Ray call, read by the other; nothing here
holds tensors or handles.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.gpu import GPUStats
from workers.sampling import SamplingParams


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # already streamed (re-dispatch); re-prefilled too
    params: SamplingParams
    kv_endpoint: str  # the decode worker's KV receiver
    generation: int = 0  # the controller's dispatch number, echoed in the result


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    token_id: int | None  # the token sampled after the prompt; None if aborted
    text: str  # its text delta
    finish_reason: str | None  # "stop" | "length" when the request ends here
    transfer_ok: bool  # every KV block landed intact (after at most one retry)
    transfer_attempts: int
    kv_bytes: int
    transfer_s: float
    queue_s: float  # waiting on the prefill worker before its first chunk ran
    prefill_s: float  # from its first chunk to the sampled token
    aborted: bool = False
    error: str = ""
    generation: int = 0  # the job's dispatch number (results of older dispatches are stale)


@dataclass(frozen=True)
class TokenEvent:
    """Tokens a decode worker produced for one request in one step."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None  # set on the last event of the request


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    role: str
    gpu_type: str
    queued_prefill_tokens: int
    running: int
    free_kv_blocks: int
    total_kv_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    device_name: str = ""  # NVML device name, or "emulated:<T>"
    prefix_cache_queries: int = 0  # cumulative blocks looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative blocks found there
    gpu: GPUStats | None = None  # NVML sample (at most ~1 s old); None without a GPU


@dataclass(frozen=True)
class ReserveItem:
    """One KV reservation in a decode worker's ``reserve_batch``."""

    request_id: str
    token_ids: list[int]  # prompt + outputs so far: the KV that will arrive
    generation: int = 0  # the dispatch it is for; only an admit of the same one uses it


@dataclass(frozen=True)
class AdmitItem:
    """One request in ``admit_batch`` (decode after a KV transfer) or
    ``submit_batch`` (prefill and decode on the same worker)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # already streamed, including the prefill's token
    params: SamplingParams
    priority: float = 0.0  # scheduler rank under KV pressure (workers/sequence.py)
    boost_steps: int = 0  # steps it keeps a raised priority
    generation: int = 0  # the dispatch it belongs to (must match the reservation's)

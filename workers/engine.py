"""``LLMEngine``: the in-process engine every Baton worker wraps.

Lifecycle of a request::

    add_request (validate; nothing changes on error)
      -> waiting queue
      -> step(): plan (BatchPlanner) -> run (ModelRunner) -> postprocess
                 (sample, detokenize, check stop conditions)
      -> RequestOutput per step with the new tokens; the last one has
         ``finished=True`` and the blocks are freed
    abort(request_id) at any time frees the request's blocks.

An engine step is three calls, as in nano-vllm: schedule, run, postprocess.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from workers.batch_planner import BatchConfig, BatchPlanner, Chunk
from workers.block_manager import BlockManager
from workers.cuda_graphs import DecodeGraphs
from workers.kv_cache import KVCache, num_blocks_for_budget
from workers.loader import LoadedModel, load_model, torch_dtype
from workers.model_runner import ModelRunner, RunItem
from workers.sampling import Sampler, SampleRequest, SamplingParams, TokenLogprob
from workers.sequence import FinishReason, Sequence, SequenceStatus
from workers.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # preset name or local Hugging Face directory
    dtype: str = "float32"  # float32 | float16 | bfloat16
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 256 << 20  # memory budget of the paged KV cache
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes when set
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int = 512
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None = the model's own limit
    seed: int = 0  # dummy weights and unseeded sampling
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's setting
    # CPU: most memory for the contiguous copy of decoding sequences' KV that decode
    # attention reads (workers.kv_cache.DecodeKVBuffer); past it, or 0, it gathers paged blocks
    decode_buffer_bytes: int = 512 << 20
    # CPU, float32: the C++ kernels of kernels.cpu_kernels (built on first use on the
    # machine, ~15 s, then cached; `make demo` / `make test` build them first): decode attention reads the
    # paged cache in place (no decode buffer), RMSNorm is one op. Ignored on CUDA and for
    # other dtypes; off, or where they cannot build (a warning): torch
    cpu_kernels: bool = True
    # where the model, the KV cache and the forward pass live: "cpu", "cuda" or "cuda:N".
    # On CUDA decode attention runs the Triton kernel of kernels.paged_attention
    device: str = "cpu"
    # CUDA: replay a recorded graph of the forward pass for decode-only steps
    # (workers.cuda_graphs); ignored on CPU
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        _check_device_name(self.device)
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes} must be > 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be > 0")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads={self.num_threads} must be > 0")
        if self.decode_buffer_bytes < 0:
            raise ValueError(f"decode_buffer_bytes={self.decode_buffer_bytes} must be >= 0")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len={self.max_model_len} must be > 0")
        torch_dtype(self.dtype)  # validates the name
        BatchConfig(self.max_num_seqs, self.max_num_batched_tokens, self.prefill_chunk_size)


def _check_device_name(device: str) -> None:
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device={device!r} must be 'cpu', 'cuda' or 'cuda:N'")


def _open_device(device: str) -> torch.device:
    """The engine's torch device; CUDA asked for where there is none is a clear error."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device "
                             f"(torch {torch.__version__}: a CPU build, or no driver)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} "
                             f"CUDA device(s) are visible")
    return dev


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]  # sampled this step (0 or 1 token)
    new_text: str  # text delta (may lag a token behind a partial UTF-8 char)
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens reused from the prefix cache
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    """A finished request, as ``generate`` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    num_cached_tokens: int
    logprobs: list[TokenLogprob]


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    emitted: int = 0  # characters of detok.text already streamed
    handoff: bool = False  # a LENGTH finish continues in another engine

    def emit_text(self, finished: bool) -> str:
        """New text to stream; with stop strings, the last ``len(stop) - 1``
        characters wait until they cannot be the start of a stop string."""
        stops = self.seq.params.stop
        hold = 0 if finished or not stops else max(len(s) for s in stops) - 1
        end = max(self.emitted, len(self.detok.text) - hold)
        delta = self.detok.text[self.emitted:end]
        self.emitted = end
        return delta


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config or EngineConfig()
        if self.config.num_threads is not None:
            # Process-wide: on shared cores, one thread per engine beats
            # oversubscription by 5-20x for decode-sized matmuls (measured).
            torch.set_num_threads(self.config.num_threads)
        self.device = _open_device(self.config.device)
        self.loaded = loaded or load_model(self.config.model, self.config.dtype, self.config.seed)
        if self.loaded.model.embed.weight.device != self.device:
            self.loaded.model.to(self.device)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = min(self.config.max_model_len or 1 << 62, self.model_config.max_model_len)
        blocks = self.config.num_kv_blocks or num_blocks_for_budget(
            self.model_config, self.config.kv_cache_bytes, self.config.block_size,
            torch_dtype(self.config.dtype))
        graphs = self.device.type == "cuda" and self.config.cuda_graphs
        # with CUDA graphs, one block more than the manager hands out: the null block
        # that rows padding a graph's batch write to
        self.kv_cache = KVCache(self.model_config, blocks + int(graphs), self.config.block_size,
                                torch_dtype(self.config.dtype), self.device)
        self.blocks = BlockManager(blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.planner = BatchPlanner(BatchConfig(
            self.config.max_num_seqs, self.config.max_num_batched_tokens,
            self.config.prefill_chunk_size), self.blocks)
        self.runner = ModelRunner(
            self.loaded.model, self.kv_cache, self.config.decode_buffer_bytes,
            self.config.cpu_kernels,
            DecodeGraphs(self.loaded.model, self.kv_cache.layer_caches, blocks,
                         self.config.block_size, self.max_model_len,
                         self.config.max_num_seqs) if graphs else None)
        self.sampler = Sampler(self.config.seed)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._requests: dict[str, _Request] = {}
        self._reserved: set[str] = set()  # blocks held for KV in transit
        self._exporting: set[str] = set()  # requests whose KV streams out per layer
        self.on_prefill_layer: Callable[[int, list[tuple[str, list[int]]]], None] | None = None
        self._arrivals = 0
        self.stats = EngineStats()

    # ----- requests ------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt)
        if len(prompt) == 0:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, *,
                    output_token_ids: list[int] | None = None, export_kv: bool = False,
                    handoff: bool = False, priority: float = 0.0, boost_steps: int = 0) -> None:
        """Queue a request; bad input raises ValueError and changes nothing.

        ``output_token_ids``: tokens already streamed to the client (a request
        resumed elsewhere): they are re-prefilled with the prompt and count
        towards ``max_tokens``. ``export_kv``: call ``on_prefill_layer`` for it.
        ``handoff``: reaching ``max_tokens`` here hands the request to another
        engine (prefill -> decode), so held-back text is not flushed.
        ``priority`` / ``boost_steps``: its rank under KV pressure (Sequence).
        """
        params = params or SamplingParams()
        outputs = list(output_token_ids or [])
        token_ids = self._check_new(request_id, prompt, params, outputs)
        seq = Sequence(request_id, token_ids, params, arrival=self._arrivals,
                       output_token_ids=outputs, priority=priority, boost_steps=boost_steps)
        self._arrivals += 1
        self._requests[request_id] = self._new_request(seq)
        self._requests[request_id].handoff = handoff
        if export_kv:
            self._exporting.add(request_id)
        self.waiting.append(seq)

    def _check_new(self, request_id: str, prompt, params: SamplingParams,
                   outputs: list[int]) -> list[int]:
        if request_id in self._requests or request_id in self._reserved:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self.encode(prompt)
        params.validate(len(token_ids), self.max_model_len)
        if outputs:
            self.encode(outputs)  # vocabulary check
            if len(outputs) >= params.max_tokens:
                raise ValueError(f"{len(outputs)} tokens already generated; max_tokens="
                                 f"{params.max_tokens} leaves nothing to do")
        needed = self.blocks.blocks_needed(len(token_ids) + params.max_tokens)
        if needed > self.blocks.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {needed} KV blocks; the cache has "
                f"{self.blocks.num_blocks}")
        return token_ids

    def _new_request(self, seq: Sequence) -> _Request:
        req = _Request(seq, IncrementalDetokenizer(self.tokenizer))
        for t in seq.output_token_ids:  # text already streamed elsewhere
            req.detok.add(t)
        req.emit_text(False)
        return req

    # ----- disaggregation: KV arriving from a prefill worker ---------------
    def reserve(self, request_id: str, token_ids: list[int]) -> list[int] | None:
        """Blocks that will receive the KV of ``token_ids``; None if full."""
        if request_id in self._requests or request_id in self._reserved:
            raise ValueError(f"request_id {request_id!r} is already in use")
        alloc = self.blocks.allocate(request_id, token_ids, reuse_prefix=False)
        if alloc is None:
            return None
        self._reserved.add(request_id)
        return list(alloc.block_ids)

    def is_reserved(self, request_id: str) -> bool:
        return request_id in self._reserved

    def release(self, request_id: str) -> bool:
        """Free a reservation whose KV never arrived (or was abandoned)."""
        if request_id not in self._reserved:
            return False
        self._reserved.discard(request_id)
        self.blocks.free(request_id)
        return True

    def admit_prefilled(self, request_id: str, prompt_token_ids: list[int],
                        output_token_ids: list[int], params: SamplingParams,
                        priority: float = 0.0, boost_steps: int = 0) -> None:
        """Start decoding a request whose KV (all tokens but the last output)
        has landed in its reserved blocks."""
        if request_id not in self._reserved:
            raise ValueError(f"request {request_id!r} has no KV reservation")
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=self._arrivals,
                       output_token_ids=list(output_token_ids), priority=priority,
                       boost_steps=boost_steps)
        self._arrivals += 1
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = SequenceStatus.RUNNING
        self._reserved.discard(request_id)
        self._requests[request_id] = self._new_request(seq)
        self.running.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; False if unknown or already done."""
        if self.release(request_id):
            return True
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        seq = req.seq
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if self.blocks.has(request_id):
            self.blocks.free(request_id)
        self.runner.forget(request_id)
        self._exporting.discard(request_id)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def sequence(self, request_id: str) -> Sequence:
        return self._requests[request_id].seq

    # ----- the step ------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.planner.plan(self.waiting, self.running)
        for seq in plan.preempted:  # their blocks were freed
            self.runner.forget(seq.request_id)
        if not plan.chunks:
            return []
        items = [self._run_item(c) for c in plan.chunks]
        t0 = time.perf_counter()
        for c in plan.chunks:
            c.seq.first_scheduled_s = c.seq.first_scheduled_s or t0
        logits = self.runner.run(items, self._layer_hook(plan.chunks, items))
        self.stats.record(plan.chunks, time.perf_counter() - t0)
        return self._postprocess(plan.chunks, logits)

    def _layer_hook(self, chunks: list[Chunk], items: list[RunItem]):
        """Per-layer callback for requests whose prefill completes this step."""
        exports = [(c.seq.request_id, it.block_table) for c, it in zip(chunks, items)
                   if it.logits == "last" and c.seq.request_id in self._exporting]
        if not exports or self.on_prefill_layer is None:
            return None
        hook = self.on_prefill_layer
        return lambda layer: hook(layer, exports)

    def _run_item(self, chunk: Chunk) -> RunItem:
        seq = chunk.seq
        start = seq.num_computed_tokens
        done = start + chunk.num_tokens == seq.num_tokens
        return RunItem(seq.token_slice(start, start + chunk.num_tokens), start,
                       list(self.blocks.block_table(seq.request_id)), "last" if done else "none",
                       seq.request_id)

    def _postprocess(self, chunks: list[Chunk], logits) -> list[RequestOutput]:
        sampled = [(c.seq, lg[-1]) for c, lg in zip(chunks, logits) if lg is not None]
        for c in chunks:
            c.seq.num_computed_tokens += c.num_tokens
        if self.blocks.enable_prefix_caching:  # without it there is nothing to commit
            for c in chunks:
                self.blocks.commit_full_blocks(
                    c.seq.request_id, c.seq.token_slice(0, c.seq.num_computed_tokens))
        if not sampled:
            return []
        rows = torch.stack([lg for _, lg in sampled])  # (n, V)
        reqs = [self._requests[s.request_id] for s, _ in sampled]
        tokens = self.sampler.sample(
            rows, [SampleRequest(r.seq.params, len(r.seq.output_token_ids)) for r in reqs])
        return [self._append_token(r, t, lg) for r, t, (_, lg) in zip(reqs, tokens, sampled)]

    def _append_token(self, req: _Request, token: int,
                      logits: torch.Tensor | None) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        seq.output_token_ids.append(token)
        lps = [] if params.logprobs is None or logits is None else [
            Sampler.logprobs(logits, token, params.logprobs)]
        req.detok.add(token)
        reason = self._finish_reason(seq, token, req.detok)
        final = reason is not None and not (req.handoff and reason is FinishReason.LENGTH)
        if final:
            req.detok.flush()
            if reason is FinishReason.STOP and params.stop:
                _cut_at_stop(req.detok, params.stop)
        if reason is not None:
            self._finish(seq, reason)
        return RequestOutput(seq.request_id, [token], req.emit_text(final),
                             reason is not None, reason, len(seq.prompt_token_ids),
                             seq.num_cached_tokens, lps)

    def _finish_reason(self, seq: Sequence, token: int,
                       detok: IncrementalDetokenizer) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            return FinishReason.STOP
        if p.stop and any(s in detok.text for s in p.stop):
            return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        self.runner.forget(seq.request_id)
        del self._requests[seq.request_id]
        self._exporting.discard(seq.request_id)

    # ----- speculative verification -------------------------------------
    @torch.inference_mode()
    def verify(self, request_id: str, draft: list[int]) -> torch.Tensor:
        """Logits (k+1, V) at every position of ``[last token] + draft`` in one
        forward pass. The draft's KV is written but not committed: follow with
        ``accept`` (or nothing: the next step overwrites it)."""
        seq = self._requests[request_id].seq
        if not seq.is_decoding:
            raise ValueError(f"request {request_id!r} is not decoding; cannot verify")
        start = seq.num_computed_tokens
        tokens = seq.token_ids[start:] + list(draft)
        if not self.blocks.append(request_id, start + len(tokens)):
            raise RuntimeError("KV cache is full: no room to verify the draft")
        item = RunItem(tokens, start, list(self.blocks.block_table(request_id)), "all", request_id)
        return self.runner.run([item])[0]

    def accept(self, request_id: str, tokens: list[int]) -> list[RequestOutput]:
        """Append verified tokens (accepted draft + the target's own token)."""
        req = self._requests[request_id]
        outputs = []
        for t in tokens:
            req.seq.num_computed_tokens = req.seq.num_tokens
            outputs.append(self._append_token(req, t, None))
            if outputs[-1].finished:
                return outputs
        seq = req.seq
        self.blocks.truncate(request_id, seq.num_tokens)
        self.blocks.commit_full_blocks(request_id, seq.token_ids[:seq.num_computed_tokens])
        return outputs

    # ----- helpers --------------------------------------------------------
    def stream(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion; results in the prompts' order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"gen-{self._arrivals + i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        seqs = [self._requests[rid].seq for rid in ids]
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[TokenLogprob]] = {rid: [] for rid in ids}
        for out in self.stream():
            if out.request_id in texts:
                texts[out.request_id].append(out.new_text)
                logprobs[out.request_id].extend(out.logprobs)
        return [Completion(s.request_id, s.prompt_token_ids, list(s.output_token_ids),
                           "".join(texts[s.request_id]), s.finish_reason, s.num_cached_tokens,
                           logprobs[s.request_id]) for s in seqs]


def _cut_at_stop(detok: IncrementalDetokenizer, stops: tuple[str, ...]) -> None:
    """Trim the text so it ends right before the first stop string."""
    found = [detok.text.find(s) for s in stops if s in detok.text]
    if found:
        detok.text = detok.text[:min(found)]


@dataclass
class EngineStats:
    """Counters of the work done, for throughput reports."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    busy_s: float = 0.0

    def record(self, chunks: list[Chunk], seconds: float) -> None:
        self.steps += 1
        self.busy_s += seconds
        for c in chunks:
            if c.seq.is_decoding and c.num_tokens == 1:
                self.decode_tokens += 1
            else:
                self.prefill_tokens += c.num_tokens

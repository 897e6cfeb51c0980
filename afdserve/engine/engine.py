"""The engine: requests in, tokens out. `add_request / step / abort_request`.

One scheduler (with its own block manager) per attention worker: attention is data-parallel,
each worker owns the KV cache of its requests. A request with n > 1 completions becomes n child
sequences (ids `"{id}#{i}"`) that are scheduled independently and reported together.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from afdserve.afd.config import DEFAULTS as AFD_DEFAULTS
from afdserve.afd.config import AFDConfig
from afdserve.config import Step3Config
from afdserve.engine.block_manager import BlockManager
from afdserve.engine.detokenizer import IncrementalDetokenizer
from afdserve.engine.executor import CacheConfig, ColocatedExecutor, Executor, ExecutorError
from afdserve.engine.request import FinishReason, Request, RequestStatus
from afdserve.engine.runner import SeqWork, StepInput
from afdserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from afdserve.model.kernels import resolve_dtype
from afdserve.sampling import Sample, SampleRequest, SamplingParams
from afdserve.tokenizer import Tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default_model"


def resolve_model_dir(model: str | Path | None) -> Path:
    path = Path(model) if model is not None else DEFAULT_MODEL_DIR
    if not path.is_dir():
        if model is None:
            raise FileNotFoundError(f"the embedded default model is missing at {path}")
        raise FileNotFoundError(f"model folder not found: {path}")
    return path


@dataclass
class EngineArgs:
    """Everything needed to start an engine; values found at start-up live on the engine."""

    model: str | Path | None = None
    """Checkpoint folder; None serves the embedded default model."""
    dtype: str = "auto"
    """"auto": bfloat16 where the checkpoint is bf16/fp16 or the CPU has bf16 arithmetic, else
    float32 (afdserve.model.kernels.resolve_dtype); or float32 / bfloat16 / float16."""
    quantization: str | None = None
    """"fp8": block-scaled FP8 linear weights, quantized at load unless the checkpoint is FP8 already
    (an FP8 checkpoint loads as FP8 without it; docs/fp8.md)."""
    afd: str | None = None
    """Disaggregated topology such as "1A1F" or "2A1F"; None runs colocated."""
    micro_batches: int = AFD_DEFAULTS["micro_batches"]
    """Micro-batches per step in AFD mode (colocated always uses 1)."""
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 512 * 2**20
    kv_cache_dtype: str = "auto"
    """"auto": the KV cache in the run's dtype; "fp8": float8_e4m3fn, 1 byte per element (docs/fp8.md)."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    """Defaults to the model's context, capped at 8192."""
    device: str | None = None
    decode_graphs: bool = True
    """Colocated CPU decode steps replayed from recorded kernel calls (docs/graphs.md); also
    $AFDSERVE_DECODE_GRAPHS=off|on|check."""
    progress: bool = False
    afd_options: dict = field(default_factory=dict)
    """Extra options for the disaggregated runtime: `afdserve.afd.config.AFDConfig` fields (timeouts,
    transfer precision, threads); an unknown one is refused by name."""
    afd_trace_file: str | None = None
    """Pipeline trace of every step (Chrome trace-event JSON; a .jsonl name: JSON lines), AFD or
    colocated; also afd_options["trace_file"] or $AFD_TRACE_FILE (docs/trace.md)."""


@dataclass
class CompletionOutput:
    index: int
    text: str
    """Finished: the whole text (cut before a stop string). Running: the text safe to show so far
    (no incomplete character, nothing that may still turn into a stop string)."""
    token_ids: list[int]
    logprobs: list[Sample] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None


@dataclass
class _Child:
    """Engine-side state of one sequence (kept in Request.data)."""

    parent: "_Parent"
    index: int
    params: SamplingParams
    seed: int
    logprobs: list[Sample] = field(default_factory=list)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    core: int
    metrics: RequestMetrics
    error: str | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_usage: float
    prompt_tokens_total: int
    generation_tokens_total: int
    decode_graphs: int = 0
    """Batch sizes whose decode steps replay a recorded graph (docs/graphs.md)."""
    decode_graph_replays_total: int = 0


class EngineDeadError(RuntimeError):
    """The engine's workers failed; it no longer accepts requests."""


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.model_dir = resolve_model_dir(args.model)
        self.config = Step3Config.from_file(self.model_dir)
        self.dtype = resolve_dtype(args.dtype, self.config.torch_dtype, args.device)
        self.tokenizer = Tokenizer.load(self.model_dir)
        self.max_model_len = min(args.max_model_len or min(self.config.max_position_embedding, 8192),
                                 self.config.max_position_embedding)
        cache = CacheConfig(args.block_size, args.num_kv_blocks, args.kv_cache_bytes, args.kv_cache_dtype)
        self.executor = self._make_executor(cache)
        sched = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, self.max_model_len)
        self.schedulers = [Scheduler(sched, BlockManager(self.executor.num_kv_blocks, args.block_size))
                           for _ in range(self.executor.num_workers)]
        self._parents: dict[str, _Parent] = {}
        self._eos = set(self.config.eos_token_id)
        if self.tokenizer and self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._error: str | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _make_executor(self, cache: CacheConfig) -> Executor:
        a = self.args
        trace = a.afd_trace_file or a.afd_options.get("trace_file") or os.environ.get("AFD_TRACE_FILE")
        if a.afd:
            from afdserve.afd.executor import AFDExecutor
            afd = AFDConfig.from_options(a.afd, a.micro_batches, **{**a.afd_options, "trace_file": trace})
            return AFDExecutor(self.model_dir, self.config, afd, self.dtype, cache, a.device, a.quantization)
        ex = ColocatedExecutor(self.model_dir, self.config, self.dtype, cache, a.device, a.progress, a.quantization,
                               a.decode_graphs)
        if trace:
            from afdserve.afd.local_trace import traced
            return traced(ex, trace, meta={"model_dir": str(self.model_dir), "dtype": str(self.dtype)})
        return ex

    # ----------------------------------------------------------------- requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        bad = [t for t in ids if type(t) is not int or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request; raises ValueError for a prompt that can never run."""
        if self._error:
            raise EngineDeadError(self._error)
        if request_id in self._parents:
            raise ValueError(f"duplicate request id {request_id!r}")
        params = params or SamplingParams()
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len}")
        core = min(range(len(self.schedulers)), key=lambda c: self._load(c))
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self._eos))
        metrics = RequestMetrics(arrival_time or time.monotonic(), num_prompt_tokens=len(ids))
        parent = _Parent(request_id, prompt if isinstance(prompt, str) else None, ids, params, [], core, metrics)
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        for i in range(params.n):
            req = Request(f"{request_id}#{i}", list(ids), min(params.max_tokens, self.max_model_len - len(ids)),
                          stop_token_ids=stops, min_tokens=params.min_tokens)
            if self.tokenizer is not None:   # the scheduler feeds it and checks its stop strings
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens)
            req.data = _Child(parent, i, params, base_seed + i)
            parent.children.append(req)
        for req in parent.children:
            self.schedulers[core].add_request(req)   # validated first child raises before state changes
        self._parents[request_id] = parent
        self.prompt_tokens_total += len(ids)

    def _load(self, core: int) -> int:
        s = self.schedulers[core]
        return s.num_running + s.num_waiting

    def abort_request(self, request_id: str) -> bool:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return False
        for child in parent.children:
            self.schedulers[parent.core].abort_request(child.request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    # --------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step on every attention worker; outputs of requests that progressed."""
        if self._error or not self._parents:
            return []
        failed = self._requeue_lost(self.executor.take_lost_workers())      # restarted while idle
        outs = [s.schedule() for s in self.schedulers]
        if all(o.is_empty for o in outs):
            return failed
        try:
            results = self.executor.execute([self._step_input(o) for o in outs])
        except ExecutorError as exc:
            return failed + self._fail_all(str(exc))
        lost = self.executor.take_lost_workers()
        touched: dict[str, _Parent] = {}
        now = time.monotonic()
        for core, (sched, out, res) in enumerate(zip(self.schedulers, outs, results)):
            if core in lost:
                continue
            sched.update_from_output(out, {rid: s.token_id for rid, s in res.items()})
            for chunk in out.chunks:
                req = chunk.request
                if req.request_id in res:
                    self._on_token(req, res[req.request_id], now)
                    touched[req.data.parent.request_id] = req.data.parent
        return failed + [self._output(p) for p in touched.values()] + self._requeue_lost(lost)

    def _requeue_lost(self, lost: dict[int, str]) -> list[RequestOutput]:
        """Attention workers started again with empty KV caches: their requests are recomputed on
        the other workers (as a preemption by recompute does), or fail when there is no other."""
        alive = [c for c in range(len(self.schedulers)) if c not in lost]
        failed = []
        for parent in [p for p in self._parents.values() if p.core in lost]:
            old = self.schedulers[parent.core]
            if not alive:
                parent.error = (f"{lost[parent.core]}: the request was lost with the worker's KV cache "
                                "(the worker was started again)")
                for child in parent.children:
                    if not child.is_finished:
                        old.finish_request(child.request_id, FinishReason.ERROR)
                failed.append(self._output(parent))
                continue
            parent.core = min(alive, key=self._load)
            for child in parent.children:
                if not child.is_finished:
                    old.finish_request(child.request_id, FinishReason.ABORT)     # frees its blocks
                    child.status, child.finish_reason, child.num_computed_tokens = RequestStatus.WAITING, None, 0
                    self.schedulers[parent.core].add_request(child)
        return failed

    def _step_input(self, out: SchedulerOutput) -> StepInput:
        seqs = []
        for c in out.chunks:
            req, child = c.request, c.request.data
            tokens = req.token_ids(c.start, c.start + c.num_tokens)
            table = self.schedulers[child.parent.core].block_table(req.request_id)
            penalties = list(req.output_token_ids) if child.params.has_penalties else None
            sample = SampleRequest(child.params, child.seed, req.num_output_tokens, penalties) if c.sample else None
            seqs.append(SeqWork(req.request_id, tokens, c.start, table, sample))
        return StepInput(seqs)

    def _on_token(self, req: Request, s: Sample, now: float) -> None:
        child: _Child = req.data
        parent = child.parent
        if parent.metrics.first_token_time is None:
            parent.metrics.first_token_time = now
        self.generation_tokens_total += 1
        if child.params.logprobs is not None:
            child.logprobs.append(s)

    def _output(self, parent: _Parent) -> RequestOutput:
        outs = []
        for req in parent.children:
            c: _Child = req.data
            reason = req.finish_reason.value if req.finish_reason else None
            text = req.detokenizer.output_text(req.is_finished) if req.detokenizer is not None else ""
            outs.append(CompletionOutput(c.index, text, list(req.output_token_ids),
                                         list(c.logprobs) if c.params.logprobs is not None else None,
                                         reason, req.stop_reason))
        finished = all(r.is_finished for r in parent.children)
        parent.metrics.num_generated_tokens = sum(r.num_output_tokens for r in parent.children)
        if finished:
            parent.metrics.finish_time = time.monotonic()
            self._parents.pop(parent.request_id, None)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                             parent.metrics, parent.error)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        """A worker died: every in-flight request ends with an error; the engine refuses new work."""
        self._error = message
        outs = []
        for parent in list(self._parents.values()):
            parent.error = message
            for child in parent.children:
                if not child.is_finished:
                    self.schedulers[parent.core].finish_request(child.request_id, FinishReason.ERROR)
            outs.append(self._output(parent))
        return outs

    # ------------------------------------------------------------------ status
    def health(self) -> str | None:
        """None when healthy, else what failed."""
        return self._error or self.executor.health()

    def stats(self) -> EngineStats:
        total = sum(s.num_kv_blocks for s in self.schedulers)
        free = sum(s.num_free_kv_blocks for s in self.schedulers)
        runner = getattr(self.executor, "runner", None)          # colocated executors only
        graphs = getattr(runner, "graphs", None)
        return EngineStats(sum(s.num_running for s in self.schedulers), sum(s.num_waiting for s in self.schedulers),
                           total, free, 1 - free / total if total else 0.0,
                           self.prompt_tokens_total, self.generation_tokens_total,
                           sum(g.validated for g in graphs.graphs.values()) if graphs else 0,
                           graphs.replays if graphs else 0)

    def close(self) -> None:
        self.executor.close()

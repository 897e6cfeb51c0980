"""Continuous-batching scheduler with chunked prefill and recompute preemption.

Plain Python (no torch): the engine calls ``schedule()``, runs the model on the
returned chunks, then ``update_from_output()`` with the sampled tokens, which also feeds each
request's detokenizer and decides, in one place, whether a stop string, a stop token or the
length budget ends it.

Each step hands out a token budget. Running requests go first, in admission
order; each asks for ``min(remaining, budget)`` tokens (a decode asks for 1).
When the cache is short, the most recently admitted running request is
preempted: its blocks are freed and it is recomputed later from the front of
the waiting queue. Then waiting requests are admitted in FCFS order until the
budget, ``max_num_seqs`` or the blocks run out; the first one that does not fit
stops admission, so no request is overtaken (no starvation).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from afdserve.engine.block_manager import BlockManager
from afdserve.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of the scheduler."""

    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step, summed over all chunks."""
    max_model_len: int = 4096
    """Longest request, prompt plus output."""
    enable_chunked_prefill: bool = True
    """Split a prefill larger than the remaining budget across steps."""

    def __post_init__(self):
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) <= 0:
            raise ValueError(f"scheduler limits must be positive: {self}")
        # Without chunking, a whole (re)computed sequence must fit one step's budget.
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request computed in this step: positions ``start .. start+num_tokens-1``."""

    request: Request
    start: int
    """First position computed; equals ``request.num_computed_tokens`` at schedule time."""
    num_tokens: int
    """Number of positions computed in this step."""
    sample: bool
    """True when the chunk reaches the last known token, so a new token is sampled from its logits."""

    @property
    def is_decode(self) -> bool:
        """One new token over cached context, producing the next token."""
        return self.num_tokens == 1 and self.start > 0 and self.sample


@dataclass(frozen=True)
class SchedulerOutput:
    """What the model computes in one step."""

    chunks: tuple[ScheduledChunk, ...]
    """Decodes first, then prefills (incl. chunked and recomputed), each in scheduling order."""
    preempted: tuple[str, ...]
    """Ids of requests preempted in this step; their KV is gone and will be recomputed."""
    num_batched_tokens: int
    """Sum of ``num_tokens`` over ``chunks``; at most ``max_num_batched_tokens``."""

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Decides which tokens of which requests to compute each step and owns their lifecycle."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests re-enter at the front
        self.running: list[Request] = []  # admission order; the last one is preempted first
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        # The cache bounds a sequence too: continuing one of n tokens needs n slots.
        self._max_len = min(config.max_model_len, block_manager.capacity + 1)

    # -- request lifecycle ------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; raises ``ValueError`` if it can never run."""
        n = request.num_prompt_tokens
        if n == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if n >= self.config.max_model_len:
            raise ValueError(f"prompt of {n} tokens leaves no room under max_model_len={self.config.max_model_len}")
        if n > self.block_manager.capacity:
            raise ValueError(f"prompt of {n} tokens exceeds the KV cache ({self.block_manager.capacity} slots)")
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a waiting or running request; None if it is unknown or already finished."""
        return self.finish_request(request_id, FinishReason.ABORT)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a request for a reason found outside the scheduler (stop string, error)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, reason)
        return request

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request by id."""
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def num_free_kv_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        """The KV blocks of a scheduled request, in order."""
        return self.block_manager.block_table(request_id)

    # -- scheduling ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, chunks, preempted)
        self._schedule_waiting(budget, chunks, preempted)
        ordered = [c for c in chunks if c.is_decode] + [c for c in chunks if not c.is_decode]
        return SchedulerOutput(tuple(ordered), tuple(preempted), sum(c.num_tokens for c in chunks))

    def _schedule_running(self, budget: int, chunks: list[ScheduledChunk], preempted: list[str]) -> int:
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted by an earlier request in this loop
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._reserve(request, num_tokens, preempted):
                continue
            chunks.append(self._chunk(request, num_tokens))
            budget -= num_tokens
        return budget

    def _reserve(self, request: Request, num_tokens: int, preempted: list[str]) -> bool:
        """Allocate blocks for ``request``'s next chunk, preempting newer requests if short.

        Returns False if ``request`` itself had to be preempted.
        """
        end = request.num_computed_tokens + num_tokens
        while not self.block_manager.can_allocate(request.request_id, end):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        self.block_manager.allocate(request.request_id, end)
        return True

    def _schedule_waiting(self, budget: int, chunks: list[ScheduledChunk], preempted: list[str]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.request_id in preempted:
                break  # not re-admitted in the step that preempted it
            num_tokens = self._admit_size(request, budget)
            end = request.num_computed_tokens + num_tokens
            if num_tokens == 0 or not self.block_manager.can_allocate(request.request_id, end):
                break  # FCFS: no overtaking
            self.block_manager.allocate(request.request_id, end)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._chunk(request, num_tokens))
            budget -= num_tokens

    def _admit_size(self, request: Request, budget: int) -> int:
        """Tokens to compute for a newly admitted request; 0 if it must wait for a bigger budget."""
        remaining = request.num_tokens - request.num_computed_tokens
        if self.config.enable_chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget else 0

    @staticmethod
    def _chunk(request: Request, num_tokens: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(request, start, num_tokens, sample=start + num_tokens == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, keep the outputs, requeue at the front."""
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # -- results ---------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Apply one step's results; return the requests that finished in it.

        ``sampled`` maps request id -> new token for every chunk with ``sample=True``.
        Chunks of requests finished (e.g. aborted) since ``schedule()`` are skipped.
        """
        finished = []
        for chunk in output.chunks:
            request = chunk.request
            if self._requests.get(request.request_id) is not request:
                continue
            if request.num_computed_tokens != chunk.start:
                raise RuntimeError(f"chunk of {request.request_id!r} applied twice or out of order")
            request.num_computed_tokens += chunk.num_tokens
            if not chunk.sample:
                continue
            token = sampled[request.request_id]
            request.output_token_ids.append(token)
            if request.detokenizer is not None:
                request.detokenizer.add(token)
            reason = self._stop_reason(request)
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason)
                finished.append(request)
        return finished

    def _stop_reason(self, request: Request) -> FinishReason | None:
        """The one place a request's own tokens end it: stop string, stop token, then length."""
        detok = request.detokenizer
        if detok is not None and detok.stop_string is not None:
            request.stop_reason = detok.stop_string
            return FinishReason.STOP
        last = request.output_token_ids[-1]
        if request.num_output_tokens >= request.min_tokens and last in request.stop_token_ids:
            request.stop_reason = last
            return FinishReason.STOP
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self._max_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """Mark finished and release blocks; the caller has removed it from its queue."""
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]

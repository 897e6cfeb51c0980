"""A generation request as the scheduler sees it: token ids and progress, no tensors.

A request only tracks how many of its tokens have KV in the cache
(``num_computed_tokens``) against how many tokens it has (``num_tokens``).
``num_tokens - num_computed_tokens`` tokens still need computing, which makes
prefill, chunked prefill, decode and recompute after preemption one case.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afdserve.engine.detokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    """Where a request is: queued (no KV blocks), running (holds blocks) or done."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    """Why a request finished; the values are the OpenAI ``finish_reason`` strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)
class Request:
    """One sequence: prompt, generated tokens so far, and scheduling state.

    Compared by identity (``eq=False``): two requests with equal tokens are
    still different requests.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    """Budget of generated tokens."""
    stop_token_ids: frozenset[int] = frozenset()
    """Tokens that end generation (EOS included unless ignore_eos); filled by the engine."""
    min_tokens: int = 0
    """Stop tokens are ignored while fewer than this many tokens have been generated."""
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens (prefix of ``all_token_ids``) whose KV is in the cache."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """What ended a STOP: the stop string, or the stop token id."""
    detokenizer: "IncrementalDetokenizer | None" = None
    """The output text and its stop strings; fed each new token by the scheduler."""
    num_preemptions: int = 0
    data: Any = None
    """Opaque slot for the engine (sampling params, logprobs)."""

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        """``all_token_ids[start:stop]`` without building the whole list (a decode step reads one)."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n:stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

"""Sampling parameters (user-facing, validated) and the batched sampler.

Reproducibility: a request with a `seed` draws its k-th token from a generator seeded with
(seed, k), so its output does not depend on what else is in the batch, on preemption, or on
which worker samples it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afdserve.model.kernels import native_argmax


@dataclass
class SamplingParams:
    """How to pick tokens for one request (OpenAI-style names)."""

    n: int = 1
    """Completions to generate for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: disabled."""
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends before the first occurrence, which is not returned."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """Return the sampled token's logprob and the top-N alternatives (N = this value, 0..20)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k must be -1, 0 or a positive integer"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "min_tokens must be between 0 and max_tokens"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs must be an integer in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class SampleRequest:
    """One row of a sampling batch."""

    params: SamplingParams
    seed: int | None = None
    num_generated: int = 0
    """Tokens generated so far: the step index of the seeded stream."""
    output_token_ids: list[int] | None = None
    """Only sent when penalties need them."""


@dataclass
class Sample:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def apply_penalties(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """The logits with each row's frequency / presence penalties applied: a copy where a row has
    any to apply (the caller's logits stay as they are), else `logits` itself."""
    out = logits
    for i, r in enumerate(rows):
        p = r.params
        if not p.has_penalties or not r.output_token_ids:
            continue
        if out is logits:
            out = logits.clone()
        ids = torch.tensor(r.output_token_ids, dtype=torch.int64)
        counts = torch.bincount(ids, minlength=out.shape[1]).to(out.dtype)
        out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
    return out


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row of fp32 logits [V]."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p   # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def _generator(r: SampleRequest) -> torch.Generator | None:
    if r.seed is None:
        return None
    # (seed, step) -> an independent stream per token position.
    return torch.Generator().manual_seed((r.seed * 1_000_003 + r.num_generated) % (2**63))


def sample(logits: torch.Tensor, rows: list[SampleRequest]) -> list[Sample]:
    """logits: fp32 [n, V], one row per request -> one Sample per row."""
    logits = apply_penalties(logits.float(), rows)
    need_logprobs = any(r.params.logprobs is not None for r in rows)
    logprobs = torch.log_softmax(logits, -1) if need_logprobs else None
    best = native_argmax(logits)
    greedy = (best if best is not None else logits.argmax(-1)).tolist()
    out = []
    for i, r in enumerate(rows):
        p = r.params
        if p.greedy:
            token = greedy[i]
        else:
            probs = torch.softmax(_filter(logits[i], p), -1)
            token = int(torch.multinomial(probs, 1, generator=_generator(r)))
        s = Sample(token)
        if p.logprobs is not None:
            s.logprob = float(logprobs[i, token])
            if p.logprobs:
                vals, ids = torch.topk(logprobs[i], p.logprobs)
                s.top_logprobs = list(zip(ids.tolist(), vals.tolist()))
            else:
                s.top_logprobs = []
        out.append(s)
    return out

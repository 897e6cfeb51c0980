"""Executors run the model for the engine; all implement `Executor`, the one interface the
engine, the server and the benchmarks use.

`ColocatedExecutor` runs everything in this process; the disaggregated executor lives in
`afdserve.afd` (`AFDExecutor`), and `afdserve.afd.local_trace.TracedExecutor` wraps a colocated
one to trace its steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from afdserve.config import Step3Config
from afdserve.engine.runner import ModelRunner, StepInput
from afdserve.model.attention import KVCache, kv_cache_dtype
from afdserve.model.checkpoint import load_model, parse_dtype
from afdserve.model.kernels import prepare_for_decode
from afdserve.sampling import Sample

if TYPE_CHECKING:
    from afdserve.afd.trace import TraceLog


class ExecutorError(RuntimeError):
    """A worker failed or stopped answering; requests in flight cannot complete."""


class Executor(Protocol):
    """What the engine, the server and the benchmarks may ask of an executor."""

    num_workers: int
    """Attention workers (data-parallel; each owns its requests' KV cache)."""
    num_kv_blocks: int
    """KV blocks per attention worker."""
    traces: "TraceLog | None"
    """The pipeline trace of recent steps, when traced."""

    def execute(self, steps: list[StepInput]) -> list[dict[str, Sample]]:
        """One StepInput per attention worker -> one {request_id: Sample} each."""
    def health(self) -> str | None:
        """None when healthy, else a description of the failure (or of the recovery under way)."""
    def take_lost_workers(self) -> dict[int, str]:
        """Attention workers restarted since the last call (index -> reason): their requests'
        KV caches are gone."""
    def recovery_stats(self) -> dict:
        """Counts for /metrics: {"restarts": {(role, reason): n}, "replays": n}; empty when none can happen."""
    def trace_summary(self) -> dict[str, float]:
        """Per-step means of the disaggregated pipeline's stages (/metrics; empty when colocated)."""
    @property
    def pids(self) -> dict[str, int]:
        """Worker processes by name (empty when everything runs in this process)."""
    @property
    def local_model(self):
        """The whole model when it runs in this process (hooks, profiles), else None."""
    def close(self) -> None: ...


@dataclass(frozen=True)
class CacheConfig:
    """KV cache sizing, decided at start-up (never written back into the model config)."""

    block_size: int = 16
    num_blocks: int | None = None
    """Explicit block count per attention worker; else derived from `memory_bytes`."""
    memory_bytes: int = 512 * 2**20
    dtype: str = "auto"
    """`kv_cache_dtype`: "auto" (the run's dtype) or "fp8" (float8_e4m3fn, 1 byte per element:
    twice the blocks of bf16 for the same `memory_bytes`; docs/fp8.md)."""

    def __post_init__(self):
        kv_cache_dtype(self.dtype, torch.float32)      # ValueError naming the allowed values

    def torch_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The cache's element type in a run of `dtype`."""
        return kv_cache_dtype(self.dtype, dtype)

    def blocks_for(self, config: Step3Config, dtype: torch.dtype) -> int:
        if self.num_blocks is not None:
            if self.num_blocks < 1:
                raise ValueError("num_kv_blocks must be >= 1")
            return self.num_blocks
        per_block = KVCache.bytes_per_block(config.num_hidden_layers, self.block_size,
                                            config.num_attention_groups, config.head_dim, self.torch_dtype(dtype))
        return max(1, self.memory_bytes // per_block)


def make_kv_cache(config: Step3Config, cache: CacheConfig, dtype: torch.dtype, device="cpu") -> KVCache:
    """The paged cache of a run in `dtype` (its elements: `cache.dtype`)."""
    return KVCache(config.num_hidden_layers, cache.blocks_for(config, dtype), cache.block_size,
                   config.num_attention_groups, config.head_dim, cache.torch_dtype(dtype), device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ColocatedExecutor:
    """Attention and FFN in this process, one attention worker."""

    num_workers = 1

    def __init__(self, model_dir: str | Path, config: Step3Config, dtype: str = "float32",
                 cache: CacheConfig = CacheConfig(), device: str | None = None, progress: bool = False,
                 quantization: str | None = None, graphs: bool = True):
        device = device or default_device()
        torch_dtype = parse_dtype(dtype)
        model = prepare_for_decode(load_model(model_dir, torch_dtype, config=config, device=device, progress=progress,
                                              quantization=quantization))
        kv = make_kv_cache(config, cache, torch_dtype, device)
        self.num_kv_blocks = kv.num_blocks
        self.runner = ModelRunner(model, kv, graphs=graphs)
        self.traces = None

    def execute(self, steps: list[StepInput]) -> list[dict[str, Sample]]:
        return [self.runner.execute(steps[0])]

    def health(self) -> str | None:
        return None

    def take_lost_workers(self) -> dict[int, str]:
        return {}

    def recovery_stats(self) -> dict:
        return {}

    def trace_summary(self) -> dict[str, float]:
        return {}

    @property
    def pids(self) -> dict[str, int]:
        return {}

    @property
    def local_model(self):
        return self.runner.model

    def close(self) -> None:
        pass

"""Executors run the model for the engine. All share one small interface:

    num_workers     attention workers (data-parallel; each owns its requests' KV cache)
    num_kv_blocks   KV blocks per attention worker
    execute(steps)  one StepInput per attention worker -> one {request_id: Sample} each
    health()        None when healthy, else a description of the failure
    close()

`ColocatedExecutor` runs everything in this process; the disaggregated executor lives in
`afdserve.afd`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from afdserve.config import Step3Config
from afdserve.engine.runner import ModelRunner, StepInput
from afdserve.model.attention import KVCache
from afdserve.model.checkpoint import load_model, parse_dtype
from afdserve.model.kernels import prepare_for_decode
from afdserve.sampling import Sample


class ExecutorError(RuntimeError):
    """A worker failed or stopped answering; requests in flight cannot complete."""


@dataclass(frozen=True)
class CacheConfig:
    """KV cache sizing, decided at start-up (never written back into the model config)."""

    block_size: int = 16
    num_blocks: int | None = None
    """Explicit block count per attention worker; else derived from `memory_bytes`."""
    memory_bytes: int = 512 * 2**20

    def blocks_for(self, config: Step3Config, dtype: torch.dtype) -> int:
        if self.num_blocks is not None:
            if self.num_blocks < 1:
                raise ValueError("num_kv_blocks must be >= 1")
            return self.num_blocks
        per_block = KVCache.bytes_per_block(config.num_hidden_layers, self.block_size,
                                            config.num_attention_groups, config.head_dim, dtype)
        return max(1, self.memory_bytes // per_block)


def make_kv_cache(config: Step3Config, cache: CacheConfig, dtype: torch.dtype, device="cpu") -> KVCache:
    return KVCache(config.num_hidden_layers, cache.blocks_for(config, dtype), cache.block_size,
                   config.num_attention_groups, config.head_dim, dtype, device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ColocatedExecutor:
    """Attention and FFN in this process, one attention worker."""

    num_workers = 1

    def __init__(self, model_dir: str | Path, config: Step3Config, dtype: str = "float32",
                 cache: CacheConfig = CacheConfig(), device: str | None = None, progress: bool = False,
                 quantization: str | None = None):
        device = device or default_device()
        torch_dtype = parse_dtype(dtype)
        model = prepare_for_decode(load_model(model_dir, torch_dtype, config=config, device=device, progress=progress,
                                              quantization=quantization))
        kv = make_kv_cache(config, cache, torch_dtype, device)
        self.num_kv_blocks = kv.num_blocks
        self.runner = ModelRunner(model, kv)

    def execute(self, steps: list[StepInput]) -> list[dict[str, Sample]]:
        return [self.runner.execute(steps[0])]

    def health(self) -> str | None:
        return None

    def close(self) -> None:
        pass

"""What the engine process and its AFD workers say to each other over a worker's control channel.

The engine sends each local worker its `WorkerSpec` first; then, to an attention worker,
`Step` (answered by `StepDone` or `Failed`), `Reform` (answered by `Ready` or `Failed`) and
`Stop`. A worker that finished loading says `Ready`. FFN workers get no messages: they follow
the attention workers' headers (`connector.py`) and end when their control channel closes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from afdserve.afd.config import AFDConfig
from afdserve.afd.trace import StepTrace
from afdserve.engine.executor import CacheConfig
from afdserve.engine.runner import StepInput
from afdserve.sampling import Sample


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of one AFD deployment is started with (picklable)."""

    afd: AFDConfig
    """The deployment's settings; the runtime ones (`AFDConfig.runtime`) are attention worker 0's."""
    model_dir: str
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)
    quantization: str | None = None
    """Passed to `load_model` (e.g. "fp8": quantize linear weights at load)."""


@dataclass
class Ready:
    num_kv_blocks: int


@dataclass
class Step:
    step: StepInput
    micro_batches: int | None = None
    """Change the micro-batch count from this step on (FFN workers follow via the header)."""
    a2f: str | None = None
    """Change the A->F encoding from this step on ('model' or '8bit'; FFN workers follow via the header)."""


@dataclass
class Reform:
    """Drop the process group and join generation `generation` (the KV cache stays)."""

    generation: int


@dataclass
class Stop:
    pass


@dataclass
class StepDone:
    samples: dict[str, Sample]
    trace: StepTrace


@dataclass
class Failed:
    """A step, start-up or re-formation failed (a worker whose group broke mid-step stays alive
    with its KV cache and waits for `Reform`)."""

    message: str

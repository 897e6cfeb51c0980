"""`AFDConfig`: every setting of a disaggregated deployment, its defaults and checks, in one place.

Torch-free. Built once (from `EngineArgs.afd` / `micro_batches` / `afd_options`, or from the
`afdserve serve --afd ...` options that `options.py` derives from the fields below), validated
once, and handed whole to the executor and, inside each `WorkerSpec`, to every worker process.
Steps may change the micro-batch count and the A->F precision: `dataclasses.replace` makes the
new config and checks it again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from afdserve.afd.topology import Topology, parse_topology

A2F_CHOICES = ("model", "8bit")
"""A->F activation precision: the model dtype, or 8-bit (FP8 e4m3, int8 fallback) with per-token scales."""
F2A_CHOICES = ("bfloat16", "float32", "float16")
"""F->A precision of the FFN outputs (None: the model dtype)."""
RUNTIME_FIELDS = ("micro_batches", "a2f", "f2a_dtype", "link_latency_ms")
"""Set by attention worker 0 and adopted by every worker (remote FFN workers learn them in the handshake)."""


def check_a2f(a2f: str) -> str:
    if a2f not in A2F_CHOICES:
        raise ValueError(f"a2f must be 'model' or '8bit', not {a2f!r}")
    return a2f


def check_micro_batches(m: int) -> int:
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, not {m!r}")
    return m


@dataclass(frozen=True)
class AFDConfig:
    """One deployment's settings (picklable; see docs/afd.md for what each one does)."""

    topology: Topology
    """x attention and y FFN workers; a string such as "2A1F" is parsed."""
    micro_batches: int = 3
    """Micro-batches pipelined per step."""
    timeout_s: float = 30.0
    """A worker that stops answering for this long counts as lost."""
    a2f: str = "model"
    f2a_dtype: str | None = None
    link_latency_ms: float = 0.0
    """Benchmarking only: emulated A<->F link latency per message."""
    ffn_remote: bool = False
    """Start only the attention workers; FFN workers join with `afdserve worker --role ffn`."""
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    """Rendezvous port; None: a free port picked by the executor."""
    join_timeout_s: float = 120.0
    """How long start-up waits for every worker to join."""
    rejoin_timeout_s: float | None = None
    """How long to wait for a lost remote FFN worker's replacement (None: join_timeout_s)."""
    threads_per_worker: int | None = None
    """torch threads of each local worker (None: the available cores shared among them)."""
    trace_file: str | None = None
    trace_keep: int = 256
    """Steps kept by the trace ring (and written to a Chrome trace file)."""
    max_start_attempts: int = 3
    """A worker that fails to start this many times in a row ends the deployment."""
    max_replays: int = 3
    """A step that fails this many times + 1 in a row ends the deployment."""

    def __post_init__(self) -> None:
        if not isinstance(self.topology, Topology):
            object.__setattr__(self, "topology", parse_topology(self.topology))
        if self.rejoin_timeout_s is None:
            object.__setattr__(self, "rejoin_timeout_s", self.join_timeout_s)
        check_micro_batches(self.micro_batches)
        check_a2f(self.a2f)
        if self.f2a_dtype not in (None, *F2A_CHOICES):
            raise ValueError(f"f2a_dtype must be one of {', '.join(F2A_CHOICES)} or None, not {self.f2a_dtype!r}")
        for name in ("timeout_s", "join_timeout_s", "rejoin_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        if self.link_latency_ms < 0:
            raise ValueError(f"link_latency_ms must be >= 0, not {self.link_latency_ms!r}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, not {self.threads_per_worker!r}")
        if self.trace_keep < 1 or self.max_start_attempts < 1 or self.max_replays < 0:
            raise ValueError("trace_keep and max_start_attempts must be >= 1, max_replays >= 0")

    @classmethod
    def from_options(cls, topology: str | Topology, micro_batches: int | None = None, **options) -> "AFDConfig":
        """From `EngineArgs.afd`, `micro_batches` and `afd_options`: an unknown option is named."""
        known = {f.name for f in fields(cls)} - {"topology", "micro_batches"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown AFD option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if micro_batches is not None:
            options["micro_batches"] = micro_batches
        return cls(topology, **options)

    @property
    def heartbeat_s(self) -> float:
        """Heartbeat period of every worker."""
        return min(0.5, self.timeout_s / 10)

    @property
    def stale_s(self) -> float:
        """A heartbeat counter that stops moving for this long counts as stalled."""
        return max(3 * self.heartbeat_s, 0.6 * self.timeout_s)

    @property
    def step_timeout_s(self) -> float:
        """How long the engine waits for every attention worker's answer to a step."""
        return self.timeout_s * 2 + 5.0

    @property
    def ready_timeout_s(self) -> float:
        """How long the engine waits for Ready once the group is formed (loading the model)."""
        return 60.0 + self.timeout_s

    def runtime(self) -> dict:
        """The settings attention worker 0 announces in its hello (JSON)."""
        return {k: getattr(self, k) for k in RUNTIME_FIELDS}

    def adopt(self, runtime: dict) -> "AFDConfig":
        """This config with attention worker 0's runtime settings."""
        return replace(self, **{k: runtime[k] for k in RUNTIME_FIELDS if k in runtime})


DEFAULTS = {f.name: f.default for f in fields(AFDConfig) if f.name != "topology"}
"""Each setting's default (the CLI options show these)."""

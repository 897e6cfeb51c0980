"""The colocated run's pipeline trace: the same stages as AFD, in one track.

`traced(executor, path)` wraps a `ColocatedExecutor`: its runner's FFN backend becomes a
`TracedLocalFFN`, which records the attention half (+ router) and the FFN half of every layer and
micro-batch, and every step lands in a `TraceLog` written as Chrome trace JSON (or JSON lines for
a .jsonl name) like an AFD run's (`afdserve.afd.timeline`).
"""
from __future__ import annotations

import time

from afdserve.afd.config import DEFAULTS
from afdserve.afd.trace import ATTENTION, FFN, SpanRecorder, StepTrace, TraceLog
from afdserve.engine.executor import ColocatedExecutor
from afdserve.engine.runner import LocalFFN


class TracedLocalFFN(LocalFFN):
    """LocalFFN that times attention (since the previous FFN call) and FFN per layer x micro-batch."""

    def __init__(self, model):
        super().__init__(model)
        self.rec = SpanRecorder()
        self.tokens, self.micro_batches, self._mark = 0, 1, 0.0

    def begin_step(self, num_micro_batches: int) -> None:
        super().begin_step(num_micro_batches)
        self.tokens, self.micro_batches = 0, num_micro_batches
        self._mark = time.perf_counter()

    def submit(self, layer: int, micro_batch: int, inp) -> None:
        t0 = time.perf_counter()
        super().submit(layer, micro_batch, inp)
        t1 = time.perf_counter()
        self.rec.add(ATTENTION, layer, micro_batch, self._mark, t0)
        self.rec.add(FFN, layer, micro_batch, t0, t1)
        if layer == 0:
            self.tokens += inp.x.shape[0]
        self._mark = t1

    def collect(self, layer: int, micro_batch: int):
        y = super().collect(layer, micro_batch)
        self._mark = time.perf_counter()
        return y


class TracedExecutor(ColocatedExecutor):
    """A colocated executor whose steps are traced (it takes over the wrapped one's model and cache)."""

    def __init__(self, inner: ColocatedExecutor, path: str | None, keep: int = DEFAULTS["trace_keep"],
                 meta: dict | None = None):
        self.num_kv_blocks, self.runner = inner.num_kv_blocks, inner.runner
        self.ffn = TracedLocalFFN(self.runner.model)
        self.runner.ffn = self.ffn
        self.runner.graphs = None     # a replayed step has no layer halves to time (docs/graphs.md)
        import torch
        self.traces = TraceLog(keep, path, meta={"kind": "colocated", "topology": "colocated", "micro_batches": 1,
                                                 "threads": torch.get_num_threads(), "shared_clock": True,
                                                 **(meta or {})})

    def execute(self, steps):
        t0 = time.perf_counter()
        out = super().execute(steps)
        ms = (time.perf_counter() - t0) * 1e3
        f = self.ffn
        self.traces.add([StepTrace(0, f.tokens, f.micro_batches, step_ms=ms, spans=f.rec.take(), colocated=True)])
        return out

    def trace(self, n: int | None = None) -> list[dict]:
        return self.traces.recent(n)

    def close(self) -> None:
        self.traces.close()


def traced(executor, path: str | None, keep: int = DEFAULTS["trace_keep"], meta: dict | None = None) -> TracedExecutor:
    return TracedExecutor(executor, path, keep, meta)

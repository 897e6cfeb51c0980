"""Per-step timings of the AFD pipeline, per layer and micro-batch.

Attention worker w records, for layer i and micro-batch j:
    attn_ms[i][j]  attention half + router (compute on the attention worker)
    wait_ms[i][j]  time blocked completing the A->F sends in `submit` and waiting for the FFN
                   partial sums in `collect` (exposed communication + FFN time the pipeline did
                   not hide)
    rtt_ms[i][j]   submit -> result available (transfer both ways + FFN queueing + FFN compute)
FFN worker k reports (to attention worker 0) ffn_ms[k][i][j], its compute time, and
recv_ms[k][i][j], the time it waited for the A->F message.

Summary: per-step means of the sums, the bubble fraction (share of attention-worker step time
spent waiting) and the hidden fraction 1 - sum(wait) / sum(rtt) (share of round trips the
pipeline overlapped with other micro-batches' attention).

Spans (for the one-clock timeline, `afdserve.afd.timeline`): every worker also records the start
and end of each stage per layer and micro-batch on its own `time.perf_counter` clock;
`ClockAligner` estimates each worker's offset from attention worker 0's (the reference clock)
from the A<->F round trips themselves. Stages:
    attention  attention half + router of layer i, micro-batch j (attention worker)
    a2f        encoding and completing the A->F sends (attention worker)
    f2a_wait   waiting for the FFN workers' partial sums (attention worker)
    a2f_wait   waiting for / receiving the A->F message, including decode (FFN worker)
    ffn        FFN compute (FFN worker; in a colocated run, in the one process)
    f2a        completing the F->A replies (FFN worker)
A span is the tuple (stage, layer, micro-batch, start us, duration us).
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from afdserve.afd.config import DEFAULTS

STAGES = ("attention", "a2f", "f2a_wait", "a2f_wait", "ffn", "f2a")
ATTENTION, A2F, F2A_WAIT, A2F_WAIT, FFN, F2A = STAGES


@dataclass
class StepTrace:
    """One attention worker's view of one step (plus FFN timings when it is worker 0)."""

    worker: int
    num_tokens: int
    micro_batches: int
    step_ms: float = 0.0
    attn_ms: list[list[float]] = field(default_factory=list)   # [L][m]
    wait_ms: list[list[float]] = field(default_factory=list)   # [L][m]
    rtt_ms: list[list[float]] = field(default_factory=list)    # [L][m]
    ffn_ms: list[list[list[float]]] = field(default_factory=list)   # [F][L][m]
    recv_ms: list[list[list[float]]] = field(default_factory=list)  # [F][L][m]
    time: float = field(default_factory=time.time)
    spans: list = field(default_factory=list)
    """This worker's spans (stage, layer, micro-batch, start us, duration us), on its own clock
    (`ClockAligner` places them on attention worker 0's)."""
    ffn_spans: list = field(default_factory=list)                   # [F] lists of spans
    step: int = -1
    """Engine step number (set by TraceLog.add)."""
    colocated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _total(rows: list[list[float]]) -> float:
    return sum(sum(r) for r in rows)


class SpanRecorder:
    """A worker's stage spans in one step: `add(stage, layer, mb, t0, t1)` with `time.perf_counter()`
    seconds. `take()` returns them in microseconds and starts a new step."""

    __slots__ = ("_spans",)

    def __init__(self):
        self._spans: list[tuple] = []

    def add(self, stage: str, layer: int, micro_batch: int, t0: float, t1: float) -> None:
        self._spans.append((stage, layer, micro_batch, t0, t1))

    def take(self) -> list[list]:
        out = [[st, i, j, t0 * 1e6, (t1 - t0) * 1e6] for st, i, j, t0, t1 in self._spans]
        self._spans = []
        return out


# ----------------------------------------------------------------- FFN worker -> attention worker 0
# An FFN worker's step timings travel as int64 nanoseconds of its own clock, four per layer
# and micro-batch (start waiting for A->F, received, computed, replies sent), viewed as float32 so
# they ride the connector's float32 trace message bit-exactly.
def ffn_stamps_len(num_layers: int, micro_batches: int) -> int:
    """float32 elements of one FFN worker's step message."""
    return 8 * num_layers * micro_batches


def pack_ffn_stamps(times: list[list[tuple[float, float, float, float]]]):
    """times[i][j] = (t0, t1, t2, t3) perf_counter seconds -> float32 tensor (int64 ns viewed)."""
    import torch
    ns = torch.tensor([[[round(t * 1e9) for t in stamp] for stamp in row] for row in times],
                      dtype=torch.int64)
    return ns.flatten().view(torch.float32)


def unpack_ffn_stamps(buf, num_layers: int, micro_batches: int) -> tuple[list, list, list]:
    """The message of `pack_ffn_stamps` -> (ffn_ms [L][m], recv_ms [L][m], spans)."""
    import torch
    ns = buf.contiguous().view(torch.int64).view(num_layers, micro_batches, 4).tolist()
    ffn_ms, recv_ms, spans = [], [], []
    for i, row in enumerate(ns):
        ffn_ms.append([(t2 - t1) / 1e6 for t0, t1, t2, t3 in row])
        recv_ms.append([(t1 - t0 + t3 - t2) / 1e6 for t0, t1, t2, t3 in row])
        for j, (t0, t1, t2, t3) in enumerate(row):
            spans += [[A2F_WAIT, i, j, t0 / 1e3, (t1 - t0) / 1e3], [FFN, i, j, t1 / 1e3, (t2 - t1) / 1e3],
                      [F2A, i, j, t2 / 1e3, (t3 - t2) / 1e3]]
    return ffn_ms, recv_ms, spans


# ----------------------------------------------------------------- clock alignment
class ClockAligner:
    """Every worker's clock offset from attention worker 0's, from the A<->F exchanges themselves.

    Each layer x micro-batch is a round trip between attention worker w and FFN worker k, timed
    on both clocks: A starts sending at a0 (start of its `a2f` span), F has the message at f1
    (end of `a2f_wait`, i.e. F's compute starts), A has F's reply at a3 (end of `f2a_wait`). F
    received after a0 and replied after f1, so the offset (F clock - A clock) lies in
    [f1 - a3, f1 - a0]: estimate its middle, uncertainty half its width (a3 - a0) / 2. (F's
    reply is started inside its compute span, so the start of `f2a` is not a safe send time: a
    descheduled FFN process stamps it after the reply has arrived.) Per pair the sample with the
    shortest round trip is kept; queueing only widens the interval. The first traced step already
    gives L x m samples per pair. Attention workers w > 0 are placed through the FFN worker that
    links them to worker 0 best. Micro-batches without tokens get no reply and give no sample.
    """

    def __init__(self):
        self.best: dict[tuple[int, int], tuple[float, float]] = {}    # (w, k) -> (delay us, offset us)

    def observe(self, traces: list[StepTrace]) -> None:
        """One step's traces (all attention workers'; FFN spans ride with worker 0's)."""
        ffn = next((t.ffn_spans for t in traces if t.ffn_spans), [])
        if not ffn:
            return
        f_idx = [{(s[0], s[1], s[2]): s for s in spans} for spans in ffn]
        for t in traces:
            if t.colocated:
                continue
            a_idx = {(s[0], s[1], s[2]): s for s in t.spans}
            for (stage, i, j), a in a_idx.items():
                back = a_idx.get((F2A_WAIT, i, j))
                if stage != A2F or back is None:
                    continue
                for k, fi in enumerate(f_idx):
                    recv = fi.get((A2F_WAIT, i, j))
                    if recv is not None and (F2A, i, j) in fi:
                        self._sample(t.worker, k, a[3], recv[3] + recv[4], back[3] + back[4])

    def _sample(self, w: int, k: int, a0: float, f1: float, a3: float) -> None:
        delay = a3 - a0
        old = self.best.get((w, k))
        if old is None or delay < old[0]:
            self.best[(w, k)] = (delay, f1 - (a0 + a3) / 2)

    def table(self) -> dict[str, tuple[float, float]]:
        """Track name -> (offset us, uncertainty us): reference time = local time - offset."""
        out = {"attention 0": (0.0, 0.0)}
        for (w, k), (delay, off) in self.best.items():
            if w == 0:
                out[f"ffn {k}"] = (off, delay / 2)
        for (w, k), (delay, off) in self.best.items():
            via = self.best.get((0, k))
            if w == 0 or via is None:
                continue
            cand = (via[1] - off, (via[0] + delay) / 2)
            if f"attention {w}" not in out or cand[1] < out[f"attention {w}"][1]:
                out[f"attention {w}"] = cand
        return out


# ----------------------------------------------------------------- the engine's ring
class TraceLog:
    """The most recent steps' traces (a ring). With `path`: a name ending in .jsonl appends every
    step as a JSON line (unbounded); any other name holds the ring as Chrome trace-event JSON
    (`afdserve.afd.timeline`), rewritten atomically every `flush_s` seconds by a background thread
    (never by the engine's step loop; flush_s=0: at every step) and on `close`, so the file is
    always complete and bounded by `keep` steps. Each step's events are built once and cached."""

    def __init__(self, keep: int = DEFAULTS["trace_keep"], path: str | None = None, flush_s: float = 2.0, meta: dict | None = None):
        self.steps: deque[StepTrace] = deque(maxlen=keep)
        self.path = path
        self.jsonl = bool(path) and str(path).endswith(".jsonl")
        self.flush_s, self.meta = flush_s, dict(meta or {})
        self.aligner = ClockAligner()
        self._count, self._dirty = 0, False
        self._lock = threading.Lock()
        self._cache: dict[int, list] = {}
        self._cache_clock: dict | None = None
        self._stop = threading.Event()
        self._writer = None
        if path and not self.jsonl and flush_s > 0:
            self._writer = threading.Thread(target=self._write_loop, daemon=True, name="afd-trace-writer")
            self._writer.start()

    def add(self, traces: list[StepTrace]) -> None:
        for t in traces:
            t.step = self._count
        if self.path or not self.meta.get("shared_clock"):    # offsets matter: a file, or remote workers
            self.aligner.observe(traces)
        self._count += 1
        self.steps.extend(traces)
        if not self.path:
            return
        if self.jsonl:
            with open(self.path, "a") as f:
                for t in traces:
                    f.write(json.dumps(t.to_dict()) + "\n")
            return
        self._dirty = True
        if self._writer is None:
            self.flush()

    def _write_loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception as exc:        # a full disk must not end the engine
                print(f"afdserve: cannot write the trace {self.path}: {exc}", flush=True)

    def flush(self) -> None:
        """Write the ring as Chrome trace JSON now (no-op without a .json path or new steps)."""
        if not self.path or self.jsonl or not self._dirty:
            return
        from afdserve.afd.timeline import chrome_trace
        with self._lock:
            self._dirty = False
            clock = self.clock()
            if clock != self._cache_clock:          # offsets moved: rebuild every step's events
                self._cache, self._cache_clock = {}, clock
            steps = list(self.steps)
            live = {t.step for t in steps}
            for gone in [k for k in self._cache if k not in live]:
                del self._cache[gone]
            meta = {**self.meta, "clock_estimate": {k: list(v) for k, v in self.aligner.table().items()}}
            doc = chrome_trace(steps, clock=clock, meta=meta, cache=self._cache)
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, self.path)

    def clock(self) -> dict[str, tuple[float, float]]:
        """Track -> (offset us, uncertainty us) applied to the spans: zero when every worker runs
        on this host (`meta["shared_clock"]`: one monotonic clock for all processes), else the
        `ClockAligner` estimate (always also written, as otherData.clock_estimate)."""
        table = self.aligner.table()
        if self.meta.get("shared_clock"):
            return {k: (0.0, 0.0) for k in table}
        return table

    def close(self) -> None:
        """Stop the writer and write the last steps."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        self.flush()

    def recent(self, n: int | None = None) -> list[dict]:
        steps = list(self.steps)[-n:] if n else list(self.steps)
        return [t.to_dict() for t in steps]

    def summary(self) -> dict[str, float]:
        """Means per step over the ring: attention/ffn/wait/rtt/step ms, bubble and hidden fractions."""
        steps = [t for t in list(self.steps) if t.num_tokens > 0]   # copy: read from other threads
        if not steps:
            return {"afd_steps": 0.0}
        n = len(steps)
        attn = sum(_total(t.attn_ms) for t in steps) / n
        wait = sum(_total(t.wait_ms) for t in steps) / n
        rtt = sum(_total(t.rtt_ms) for t in steps) / n
        step = sum(t.step_ms for t in steps) / n
        with_ffn = [t for t in steps if t.ffn_ms]
        ffn = (sum(max(_total(f) for f in t.ffn_ms) for t in with_ffn) / len(with_ffn)) if with_ffn else 0.0
        return {
            "afd_steps": float(n),
            "afd_step_ms": step,
            "afd_attention_ms": attn,
            "afd_ffn_ms": ffn,
            "afd_comm_wait_ms": wait,
            "afd_round_trip_ms": rtt,
            "afd_bubble_fraction": wait / step if step else 0.0,
            "afd_hidden_fraction": 1.0 - wait / rtt if rtt else 0.0,
        }

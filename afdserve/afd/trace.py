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
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field


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

    def to_dict(self) -> dict:
        return asdict(self)


def _total(rows: list[list[float]]) -> float:
    return sum(sum(r) for r in rows)


class TraceLog:
    """The most recent steps' traces (a ring), optionally appended to a JSON-lines file."""

    def __init__(self, keep: int = 256, path: str | None = None):
        self.steps: deque[StepTrace] = deque(maxlen=keep)
        self.path = path

    def add(self, traces: list[StepTrace]) -> None:
        self.steps.extend(traces)
        if self.path:
            with open(self.path, "a") as f:
                for t in traces:
                    f.write(json.dumps(t.to_dict()) + "\n")

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

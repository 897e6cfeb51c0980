"""AFDExecutor: the engine's executor for Attention-FFN Disaggregation.

The engine process starts x attention workers (and, unless the FFN role is remote, y FFN workers)
as local processes (spawn), talks to each attention worker over a pipe (`Step` -> `StepDone`),
and never touches tensors itself, so it stays responsive. Attention and FFN workers exchange
hidden states directly (`connector.py`). Failures (a worker that exits, an error, or no answer
within `timeout_s`) raise ExecutorError, are reported by `health()`, and stop all local workers.
"""
from __future__ import annotations

import multiprocessing.connection as mpc
import os
import socket
import sys
import time
from pathlib import Path

import torch.multiprocessing as tmp

from afdserve.afd.topology import parse_topology
from afdserve.afd.trace import TraceLog
from afdserve.afd.worker import (Failed, HandshakeError, Ready, Step, StepDone, Stop, WorkerSpec,
                                 attention_worker_main, ffn_worker_main)
from afdserve.config import Step3Config
from afdserve.engine.executor import CacheConfig, ExecutorError, default_device
from afdserve.engine.runner import StepInput
from afdserve.sampling import Sample


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _ffn_child(spec: WorkerSpec, index: int, parent_pid: int) -> None:
    """Local FFN worker process: errors end it quietly (attention worker 0 reports them)."""
    try:
        code = ffn_worker_main(spec, index, parent_pid)
    except HandshakeError as exc:
        print(f"afdserve FFN worker {index}: {exc}", file=sys.stderr)
        code = 1
    except Exception as exc:
        print(f"afdserve FFN worker {index}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _process_state(pid: int) -> str | None:
    """'T' for a stopped process (Linux /proc), else the state letter or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class AFDExecutor:
    """x data-parallel attention workers and y FFN workers (see docs/afd.md)."""

    def __init__(self, model_dir: str | Path, config: Step3Config, topology: str = "1A1F", dtype: str = "float32",
                 cache: CacheConfig = CacheConfig(), micro_batches: int = 3, device: str | None = None,
                 timeout_s: float = 30.0, a2f: str = "model", f2a_dtype: str | None = None,
                 link_latency_ms: float = 0.0, ffn_remote: bool = False, master_addr: str = "127.0.0.1",
                 master_port: int | None = None, join_timeout_s: float = 120.0, threads_per_worker: int | None = None,
                 trace_file: str | None = None, trace_keep: int = 256, start_method: str = "spawn"):
        self.topology = parse_topology(topology)
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if a2f not in ("model", "8bit"):
            raise ValueError(f"a2f must be 'model' or '8bit', not {a2f!r}")
        self.timeout_s, self.micro_batches = float(timeout_s), micro_batches
        self._error: str | None = None
        self._closed = False
        self._next_m: int | None = None
        self._next_a2f: str | None = None
        self.traces = TraceLog(trace_keep, trace_file or os.environ.get("AFD_TRACE_FILE"))
        topo = self.topology
        local = topo.num_attention + (0 if ffn_remote else topo.num_ffn)
        self.spec = WorkerSpec(
            topo, str(model_dir), dtype, device or default_device(), master_addr,
            master_port or free_port(master_addr if master_addr != "0.0.0.0" else "127.0.0.1"),
            join_timeout_s, self.timeout_s, threads_per_worker or max(1, available_cores() // local), cache,
            {"micro_batches": micro_batches, "a2f": a2f, "f2a_dtype": f2a_dtype, "link_latency_ms": link_latency_ms})
        self._pipes: list = []
        self._procs: list[tuple[str, tmp.Process]] = []
        try:
            self._start(ffn_remote, start_method)
            readies = self._gather(Ready, join_timeout_s + 60.0 + self.timeout_s, "start-up")
        except ExecutorError:
            self.close()
            raise
        self.num_kv_blocks = min(r.num_kv_blocks for r in readies)

    @property
    def num_workers(self) -> int:
        return self.topology.num_attention

    def _start(self, ffn_remote: bool, start_method: str) -> None:
        # spawn: each worker imports torch afresh (seconds on a busy machine). forkserver: one
        # server process imports it once and forks workers from that clean state (no threads).
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', not {start_method!r}")
        ctx = tmp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(["afdserve.afd.worker"])
        me = os.getpid()
        for i in range(self.topology.num_attention):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=attention_worker_main, args=(self.spec, i, child_end, me), daemon=True,
                            name=f"afd-attention-{i}")
            p.start()
            child_end.close()
            self._pipes.append(parent_end)
            self._procs.append((f"attention worker {i}", p))
        if not ffn_remote:
            for k in range(self.topology.num_ffn):
                p = ctx.Process(target=_ffn_child, args=(self.spec, k, me), daemon=True, name=f"afd-ffn-{k}")
                p.start()
                self._procs.append((f"FFN worker {k}", p))

    # ------------------------------------------------------------------ serving
    def set_micro_batches(self, m: int) -> None:
        """Use m micro-batches from the next step on (all workers switch together)."""
        if m < 1:
            raise ValueError("micro_batches must be >= 1")
        self.micro_batches = self._next_m = m

    def set_a2f(self, a2f: str) -> None:
        """A->F transfer precision from the next step on: 'model' (model dtype) or '8bit'."""
        if a2f not in ("model", "8bit"):
            raise ValueError(f"a2f must be 'model' or '8bit', not {a2f!r}")
        self._next_a2f = a2f

    def execute(self, steps: list[StepInput]) -> list[dict[str, Sample]]:
        if self._error:
            raise ExecutorError(self._error)
        if len(steps) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} step inputs (one per attention worker), got {len(steps)}")
        for i, (pipe, s) in enumerate(zip(self._pipes, steps)):
            try:
                pipe.send(Step(s, self._next_m, self._next_a2f))
            except (OSError, ValueError):
                self._fail(f"attention worker {i} is gone (pipe closed)")
        self._next_m = self._next_a2f = None
        done = self._gather(StepDone, self.timeout_s, "step")
        self.traces.add([d.trace for d in done])
        return [d.samples for d in done]

    def _gather(self, kind: type, timeout_s: float, what: str) -> list:
        """One `kind` message from every attention worker within timeout_s, else ExecutorError."""
        deadline = time.monotonic() + timeout_s
        out: list = [None] * len(self._pipes)
        pending = dict(enumerate(self._pipes))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = ", ".join(f"attention worker {i}" for i in pending)
                self._fail(f"AFD {what} did not complete within {timeout_s:g} s: no answer from {late}"
                           f"{self._process_report(' (', ')')}")
            for conn in mpc.wait(list(pending.values()), timeout=min(remaining, 0.1)):
                i = next(k for k, c in pending.items() if c is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"attention worker {i} exited during {what}{self._process_report('; ', '')}")
                if isinstance(msg, Failed):
                    # A peer's death usually reaches the attention worker as a transport error
                    # before its exit is visible here: give it a moment, so the message names it.
                    self._await_death(1.0)
                    self._fail(self._process_report("", "; ", dead_only=True) + msg.message)
                out[i] = msg
                del pending[i]
            if pending and self._dead():
                self._fail(f"AFD worker died during {what}: {self._process_report('', '', dead_only=True)}")
        return out

    def _await_death(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._dead() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _dead(self) -> list[str]:
        return [f"{name} (pid {p.pid}) exited with code {p.exitcode}" for name, p in self._procs
                if not p.is_alive()]

    def _process_report(self, prefix: str, suffix: str, dead_only: bool = False) -> str:
        parts = self._dead()
        if not dead_only:
            parts += [f"{name} (pid {p.pid}) is stopped" for name, p in self._procs
                      if p.is_alive() and _process_state(p.pid) == "T"]
        return f"{prefix}{'; '.join(parts)}{suffix}" if parts else ""

    def _fail(self, message: str):
        self._error = message
        self._terminate()
        raise ExecutorError(message)

    # ------------------------------------------------------------------ status
    def health(self) -> str | None:
        if self._error is None and not self._closed and self._dead():
            self._error = "AFD worker died: " + "; ".join(self._dead())
        return self._error

    def trace(self, n: int | None = None) -> list[dict]:
        """The most recent steps' per-layer, per-micro-batch timings (JSON-serialisable)."""
        return self.traces.recent(n)

    def trace_summary(self) -> dict[str, float]:
        return self.traces.summary()

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs}

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop the workers: a stop message first, then terminate and kill past a deadline."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            for pipe in self._pipes:
                try:
                    pipe.send(Stop())
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 5.0
            for _, p in self._procs:
                p.join(max(0.0, deadline - time.monotonic()))
        self._terminate()

    def _terminate(self) -> None:
        for _, p in self._procs:
            if p.is_alive():
                p.kill()     # SIGKILL also ends a SIGSTOPped worker
        deadline = time.monotonic() + 5.0
        for _, p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for pipe in self._pipes:
            pipe.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

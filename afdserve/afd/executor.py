"""AFDExecutor: the engine's executor for Attention-FFN Disaggregation.

The engine process hosts the rendezvous store (`rendezvous.py`), starts x attention workers (and,
unless the FFN role is remote, y FFN workers) as fresh interpreters of `afdserve worker`
(`python -m afdserve.afd.cli worker ... --control-fd FD`: nothing of the caller's main module is
imported, so scripts without a main guard, `python -c`, the REPL and notebooks all work), talks to
each attention worker over its control channel (`Step` -> `StepDone`), and never touches tensors
itself, so it stays responsive.

Supervision (a monitor thread, idle or busy): local workers' processes (exited, or stopped as by
SIGSTOP) and every worker's heartbeat counter in the store (one that stops moving for
`stale_s` counts as stalled). `health()` names the lost worker at once.

Recovery:
* FFN worker lost: a local one is killed (if still there) and started again; a remote one's
  rank is re-opened for `afdserve worker --role ffn --rank k` to rejoin within
  `rejoin_timeout_s`. The process group is formed again (next generation: every rank drops the
  old group and joins the new one; attention workers keep their KV caches) and the interrupted
  step is replayed (it rewrites the same KV slots with the same values and samples the same
  tokens), so requests finish with exactly the tokens of an undisturbed run.
* Attention worker lost: it is started again (empty KV cache) and the step is replayed on the
  others; `take_lost_workers()` tells the engine which workers' requests must be recomputed (or,
  with one attention worker, failed).
* Bounded: a worker that fails to start `max_start_attempts` times in a row, or a step that
  fails `max_replays` + 1 times in a row, ends in ExecutorError (reported by `health()`), after
  which all local workers are stopped.
"""
from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from afdserve.afd import rendezvous as rdv
from afdserve.afd.config import AFDConfig, check_a2f, check_micro_batches
from afdserve.afd.trace import TraceLog
from afdserve.afd.protocol import Failed, Ready, Reform, Step, StepDone, Stop, WorkerSpec
from afdserve.config import Step3Config
from afdserve.engine.executor import CacheConfig, ExecutorError, default_device
from afdserve.engine.runner import StepInput
from afdserve.sampling import Sample

log = logging.getLogger("afdserve.afd")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _process_state(pid: int) -> str | None:
    """'T' for a stopped process (Linux /proc), else the state letter or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@dataclass
class LocalWorker:
    """A worker process this engine started: `afdserve worker --control-fd` with its channel."""

    name: str
    role: str
    index: int
    rank: int
    proc: subprocess.Popen
    conn: mpc.Connection

    def fault(self) -> str | None:
        code = self.proc.poll()
        if code is not None:
            return f"{self.name} (pid {self.proc.pid}) exited with code {code}"
        if _process_state(self.proc.pid) in ("T", "t"):
            return f"{self.name} (pid {self.proc.pid}) is stopped"
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()          # SIGKILL also ends a SIGSTOPped worker
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


def launch_worker(spec: WorkerSpec, role: str, index: int) -> LocalWorker:
    """Start `python -m afdserve.afd.cli worker --role R --rank I --control-fd FD` and send it its spec."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "afdserve.afd.cli", "worker", "--role", role, "--rank", str(index),
           "--control-fd", str(theirs.fileno())]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    conn = mpc.Connection(ours.detach())
    conn.send(spec)
    topo = spec.afd.topology
    rank = topo.attention_rank(index) if role == "attention" else topo.ffn_rank(index)
    name = f"{'attention' if role == 'attention' else 'FFN'} worker {index}"
    return LocalWorker(name, role, index, rank, proc, conn)


class AFDExecutor:
    """x data-parallel attention workers and y FFN workers (an `Executor`; see docs/afd.md)."""

    def __init__(self, model_dir: str | Path, config: Step3Config, afd: AFDConfig | str = "1A1F",
                 dtype: str = "float32", cache: CacheConfig = CacheConfig(), device: str | None = None,
                 quantization: str | None = None):
        afd = afd if isinstance(afd, AFDConfig) else AFDConfig(afd)
        self.topology = topo = afd.topology
        self._error: str | None = None
        self._closed = False
        self._next_m: int | None = None
        self._next_a2f: str | None = None
        self.traces = TraceLog(afd.trace_keep, afd.trace_file or os.environ.get("AFD_TRACE_FILE"))
        self.restarts: Counter = Counter()
        """(role, reason) -> workers started again or rejoined (reason: exited, stopped, stalled, ...)."""
        self.replays = 0
        """Steps run again after the process group was re-formed."""
        self._lost: dict[int, str] = {}
        self._init_state()
        local = topo.num_attention + (0 if afd.ffn_remote else topo.num_ffn)
        addr = afd.master_addr
        self.afd = afd = replace(afd, master_port=afd.master_port or free_port(addr if addr != "0.0.0.0" else "127.0.0.1"))
        self.spec = WorkerSpec(afd, str(model_dir), dtype, device or default_device(),
                               afd.threads_per_worker or max(1, available_cores() // local), cache, quantization)
        self.traces.meta.update(kind="afd", topology=str(topo), attention_workers=topo.num_attention,
                                ffn_workers=topo.num_ffn, model_dir=str(model_dir), dtype=dtype,
                                threads=self.spec.threads, micro_batches=afd.micro_batches,
                                shared_clock=not afd.ffn_remote)
        port = afd.master_port
        try:
            self._store = rdv.host_store(addr, port, afd.join_timeout_s)
            self._monitor_store = rdv.connect_store(addr, port, afd.join_timeout_s, "the engine's monitor")
        except Exception as exc:
            raise ExecutorError(f"cannot host the AFD rendezvous on {addr}:{port}: {exc}") from None
        rdv.announce_generation(self._store, 0)
        try:
            self._start()
        except ExecutorError:
            self.close()
            raise
        self._serving = True
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="afd-monitor")
        self._monitor.start()

    def _init_state(self) -> None:
        self.gen = 0
        self.workers: dict[str, LocalWorker] = {}
        self._lock = threading.RLock()           # held by a step or a recovery
        self._state = threading.Lock()           # guards the fields health() reads
        self._noted: dict[str, str] = {}
        self._recovering: str | None = None
        self._failed_starts: Counter = Counter()
        self._beats: dict[int, tuple[int, float | None]] = {}
        self._fresh: set[str] = set()
        self._hello_pids: dict[int, int] = {}
        self._stop_watch = threading.Event()
        self._serving = False                    # past start-up: a restarted attention worker lost requests
        self._monitor: threading.Thread | None = None
        self._scan_lock = threading.Lock()       # the step thread and the monitor both scan

    @property
    def num_workers(self) -> int:
        return self.topology.num_attention

    def _start(self) -> None:
        topo = self.topology
        for i in range(topo.num_attention):
            self._launch("attention", i)
        if not self.afd.ffn_remote:
            for k in range(topo.num_ffn):
                self._launch("ffn", k)
        readies = self._form(self.afd.join_timeout_s, "start-up")
        self.num_kv_blocks = min(r.num_kv_blocks for r in readies)

    def _launch(self, role: str, index: int) -> None:
        if self._closed:
            self._fail("the executor was closed")
        self._add(launch_worker(self.spec, role, index))

    def _add(self, w: LocalWorker) -> None:
        self.workers[w.name] = w
        self._fresh.add(w.name)          # joins the current generation by itself: no Reform for it
        self._forget(w.name, w.rank)

    def _forget(self, name: str, rank: int, starting: bool = True) -> None:
        """A worker replaced, its rank re-opened, or seen in a new group: no fault; its heartbeat
        is judged from now on, or, for a process still starting, from its first beat on."""
        with self._scan_lock:
            count = self._beats.get(rank, (0, None))[0]
            try:
                count = self._monitor_store.add(rdv.heartbeat_key(rank), 0)
            except Exception:
                pass
            self._beats[rank] = (count, None if starting else time.monotonic())
        with self._state:
            self._noted.pop(name, None)

    @property
    def _attention(self) -> list[LocalWorker]:
        return [self.workers[f"attention worker {i}"] for i in range(self.topology.num_attention)]

    # ------------------------------------------------------------------ serving
    def set_micro_batches(self, m: int) -> None:
        """Use m micro-batches from the next step on (all workers switch together)."""
        self._next_m = check_micro_batches(m)

    def set_a2f(self, a2f: str) -> None:
        """A->F transfer precision from the next step on: 'model' (model dtype) or '8bit'."""
        self._next_a2f = check_a2f(a2f)

    def execute(self, steps: list[StepInput]) -> list[dict[str, Sample]]:
        if len(steps) != self.num_workers:
            raise ValueError(f"expected {self.num_workers} step inputs (one per attention worker), got {len(steps)}")
        with self._lock:
            steps = list(steps)
            for attempt in range(self.afd.max_replays + 1):
                if self._error or self._closed:
                    raise ExecutorError(self._error or "the AFD executor is closed")
                done, problem = self._run_step(steps)
                if problem is None:
                    self._adopt_next()
                    self.traces.add([d.trace for d in done])
                    return [d.samples for d in done]
                lost = self._recover(problem)
                for i in lost:                   # its requests go back to the engine: replay without them
                    steps[i] = StepInput([])
                self.replays += 1
                log.warning("AFD: replaying the interrupted step (replay %d of this step): %s", attempt + 1, problem)
            self._fail(f"AFD step failed {self.afd.max_replays + 1} times in a row; last: {problem}")

    @property
    def micro_batches(self) -> int:
        """The micro-batch count of the next step."""
        return self._next_m or self.afd.micro_batches

    def _adopt_next(self) -> None:
        """A step ran with the changed settings: they are the deployment's from now on."""
        changes = {k: v for k, v in (("micro_batches", self._next_m), ("a2f", self._next_a2f)) if v}
        if changes:       # workers started from now on (replacements) start with them too
            self.afd = replace(self.afd, **changes)
            self.spec = replace(self.spec, afd=self.afd)
        self._next_m = self._next_a2f = None

    def take_lost_workers(self) -> dict[int, str]:
        """Attention workers restarted since the last call (index -> reason): the engine must
        recompute (or fail) the requests they held; their results in the last step are empty."""
        lost, self._lost = self._lost, {}
        return lost

    def _run_step(self, steps: list[StepInput]) -> tuple[list, str | None]:
        for w, s in zip(self._attention, steps):
            try:
                w.conn.send(Step(s, self._next_m, self._next_a2f))
            except (OSError, ValueError):
                pass                 # its death is found by _collect
        return self._collect(StepDone, self.afd.step_timeout_s, "step")

    def _collect(self, kind: type, timeout_s: float, what: str) -> tuple[list, str | None]:
        """One answer from every attention worker; (answers, None) when all are `kind`, else
        (answers, the problem) once every live worker has answered (so no late answer is taken
        for the next request's) or the deadline passed (the silent ones count as lost)."""
        deadline = time.monotonic() + timeout_s
        out: list = [None] * self.num_workers
        pending = {w.conn: i for i, w in enumerate(self._attention)}
        problems: list[str] = []
        while pending and time.monotonic() < deadline:
            for conn in mpc.wait(list(pending), timeout=min(0.1, max(0.0, deadline - time.monotonic()))):
                i = pending.pop(conn)
                try:
                    out[i] = conn.recv()
                except (EOFError, OSError):
                    out[i] = Failed(f"attention worker {i} exited during {what}")
                if isinstance(out[i], Failed):
                    problems.append(out[i].message)
            faults = self._scan()
            for conn, i in list(pending.items()):
                if self._attention[i].proc.poll() is not None:
                    del pending[conn]
            for name, fault in faults.items():          # end a stopped local worker now: its peers'
                w = self.workers.get(name)              # waits fail at once instead of timing out
                if w is not None and "stopped" in fault:
                    w.proc.kill()
        for i in pending.values():
            self._note(f"attention worker {i}", f"attention worker {i} did not answer within {timeout_s:g} s")
        if not problems and not pending and all(isinstance(o, kind) for o in out):
            return out, None
        faults = self._scan()
        return out, "; ".join(list(faults.values()) + problems) or f"AFD {what} failed"

    def _note(self, name: str, reason: str) -> None:
        with self._state:
            self._noted.setdefault(name, reason)

    def _fail(self, message: str):
        self._error = message
        log.error("AFD: %s", message)
        self._terminate()
        raise ExecutorError(message)

    # ------------------------------------------------------------------ recovery
    def _recover(self, problem: str) -> list[int]:
        """Replace lost workers, re-form the group; the attention workers started again."""
        if self._closed:
            self._fail("the executor is closed")
        self._await_exits(1.0)
        faults = self._scan()
        with self._state:
            self._recovering = problem
        try:
            lost = self._replace(faults)
            self._next_generation()
            readies = self._form(self.afd.rejoin_timeout_s, "re-formation")
            self.num_kv_blocks = min(self.num_kv_blocks, *(r.num_kv_blocks for r in readies))
        finally:
            with self._state:
                self._recovering = None
        return lost

    def _await_exits(self, timeout_s: float) -> None:
        """A peer's death usually reaches the attention worker as a transport error before its
        exit is visible here: give it a moment, so the right worker is replaced and named."""
        deadline = time.monotonic() + timeout_s
        while not self._scan() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _replace(self, faults: dict[str, str]) -> list[int]:
        lost = []
        for name, reason in faults.items():
            role = "attention" if name.startswith("attention") else "ffn"
            kind = "exited" if "exited" in reason else "stopped" if "stopped" in reason else "stalled"
            self.restarts[(role, kind)] += 1
            w = self.workers.get(name)
            if w is None:            # remote FFN worker: its rank is re-opened for a new process
                self._forget(name, self.topology.ffn_rank(int(name.rsplit(" ", 1)[1])))
                log.warning("AFD: %s; waiting up to %g s for `afdserve worker --role ffn --rank %s` to rejoin",
                            reason, self.afd.rejoin_timeout_s, name.rsplit(" ", 1)[1])
                continue
            log.warning("AFD: %s; starting it again", reason)
            w.kill()
            self._launch(w.role, w.index)
            if role == "attention":
                lost.append(w.index)
                self._lost[w.index] = reason
        return lost

    def _next_generation(self) -> None:
        self.gen += 1
        rdv.announce_generation(self._store, self.gen)
        for w in self._attention:
            if w.name in self._fresh:
                continue
            try:
                w.conn.send(Reform(self.gen))
            except (OSError, ValueError):
                pass

    def _form(self, join_s: float, what: str) -> list[Ready]:
        """Judge the current generation's hellos, due within `join_s` (restarting local workers
        that die meanwhile), publish the verdict, and gather every attention worker's Ready
        (loading the model may take another minute)."""
        deadline = time.monotonic() + join_s
        while (dead := self._await_hellos(deadline, join_s)) is not None:
            # Everyone who already said hello moves to the next generation with the new process.
            rdv.publish_verdict(self._store, self.gen, rdv.RETRY)
            self.gen += 1
            rdv.announce_generation(self._store, self.gen)
            self._restart_failed_start(*dead)
        verdict = rdv.judge(self._store, self.gen, self.topology)
        rdv.publish_verdict(self._store, self.gen, verdict)
        if verdict != "ok":
            self._fail(verdict)
        readies, problem = self._collect(Ready, self.afd.ready_timeout_s, what)
        if problem:
            self._fail(problem)
        self._formed()
        return readies

    def _await_hellos(self, deadline: float, join_s: float) -> tuple[LocalWorker, int] | None:
        """None once every rank said hello; a local worker that exited meanwhile and its exit
        code; ExecutorError naming who did not join by the deadline."""
        topo = self.topology
        keys = rdv.hello_keys(self.gen, range(topo.world_size))
        while not self._store.check(keys):
            for w in list(self.workers.values()):
                code = w.proc.poll()
                if code is not None:
                    return w, code
            if time.monotonic() > deadline:
                missing = [f"{rdv.describe(*topo.role_of(r))} (rank {r})" for r, k in enumerate(keys)
                           if not self._store.check([k])]
                self._fail(f"{', '.join(missing)} did not join within {join_s:g} s (rendezvous "
                           f"{self.afd.master_addr}:{self.afd.master_port})")
            time.sleep(0.05)
        return None

    def _formed(self) -> None:
        """The group of this generation stands: every worker said hello in it, so none is lost;
        count remote workers that rejoined as new processes."""
        for rank in range(self.topology.world_size):
            hello = rdv.read_hello(self._store, self.gen, rank)
            old = self._hello_pids.get(rank)
            local = any(w.rank == rank for w in self.workers.values())
            if old is not None and old != hello["pid"] and not local:
                self.restarts[("ffn", "rejoined")] += 1
                log.warning("AFD: ffn worker %s rejoined (pid %s on %s)", hello["index"], hello["pid"], hello["host"])
            self._hello_pids[rank] = hello["pid"]
            self._forget(rdv.describe(*self.topology.role_of(rank)).replace("ffn", "FFN"), rank, starting=False)
        self._failed_starts.clear()
        self._fresh.clear()

    def _restart_failed_start(self, w: LocalWorker, code: int) -> None:
        self._failed_starts[w.name] += 1
        n = self._failed_starts[w.name]
        reason = f"{w.name} (pid {w.proc.pid}) exited with code {code} during start-up"
        if n >= self.afd.max_start_attempts:
            self._fail(f"{reason}; it failed to start {n} times in a row, giving up (see its error output)")
        log.warning("AFD: %s; starting it again (attempt %d of %d)", reason, n + 1, self.afd.max_start_attempts)
        self.restarts[(w.role, "failed start")] += 1
        if w.role == "attention" and self._serving:      # its KV cache is gone
            self._lost[w.index] = reason
        w.kill()
        self._launch(w.role, w.index)

    # ------------------------------------------------------------------ liveness
    def _scan(self) -> dict[str, str]:
        """Lost workers: local processes that exited or are stopped, heartbeats that stalled. A
        worker's first reason sticks until it is replaced (killing a stopped one keeps "stopped")."""
        with self._scan_lock:
            if self._monitor_store is None:
                return dict(self._noted)
            found = self._find_faults()
        with self._state:
            for name, reason in found.items():
                self._noted.setdefault(name, reason)
            return dict(self._noted)

    def _find_faults(self) -> dict[str, str]:
        found = {w.name: f for w in self.workers.values() if (f := w.fault())}
        now, topo = time.monotonic(), self.topology
        for rank in range(topo.world_size):
            name = rdv.describe(*topo.role_of(rank)).replace("ffn", "FFN")
            try:
                count = self._monitor_store.add(rdv.heartbeat_key(rank), 0)
            except Exception:
                break
            last_count, since = self._beats.get(rank, (0, None))
            if count != last_count:
                self._beats[rank] = (count, now)
            elif since is not None and now - since > self.afd.stale_s and name not in found:
                found[name] = f"{name} (rank {rank}) sent no heartbeat for {now - since:.1f} s (stalled)"
        return found

    def _watch(self) -> None:
        """Monitor thread: keeps health() current and recovers lost workers while idle."""
        while not self._stop_watch.wait(self.afd.heartbeat_s):
            if self._closed or self._error:
                return
            faults = self._scan_quietly()
            if not faults or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed and not self._error and self._scan_quietly():
                    self._recover("while idle: " + "; ".join(faults.values()))
            except ExecutorError:
                pass                                  # recorded in self._error, reported by health()
            finally:
                self._lock.release()

    def _scan_quietly(self) -> dict[str, str]:
        try:
            return self._scan()
        except Exception:
            return {}

    # ------------------------------------------------------------------ status
    def health(self) -> str | None:
        """None when serving; else the failure, or the lost worker and the recovery under way."""
        if self._error:
            return self._error
        with self._state:
            if self._recovering:
                return f"AFD recovering: {self._recovering}"
            if self._noted:
                return "AFD worker lost: " + "; ".join(self._noted.values())
        return None

    def recovery_stats(self) -> dict:
        """Counts for /metrics: restarts by (role, reason), replayed steps."""
        return {"restarts": dict(self.restarts), "replays": self.replays}

    def trace(self, n: int | None = None) -> list[dict]:
        """The most recent steps' per-layer, per-micro-batch timings (JSON-serialisable)."""
        return self.traces.recent(n)

    def trace_summary(self) -> dict[str, float]:
        return self.traces.summary()

    @property
    def pids(self) -> dict[str, int]:
        return {name: w.proc.pid for name, w in self.workers.items()}

    local_model = None
    """The model runs in the worker processes (`Executor.local_model`)."""

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop the workers: a stop message first, then SIGKILL past a deadline; close the store."""
        if self._closed:
            return
        self._closed = True
        self.traces.close()                  # the Chrome trace file gets the last steps
        self._stop_watch.set()
        if self._error is None and self._lock.acquire(timeout=5.0):
            try:
                for w in self._attention:
                    try:
                        w.conn.send(Stop())
                    except (OSError, ValueError):
                        pass
                deadline = time.monotonic() + 5.0
                for w in self._attention:
                    try:
                        w.proc.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                self._lock.release()
        self._terminate()
        if self._monitor is not None:
            self._monitor.join(10.0)
        with self._scan_lock:            # no store call in flight while the stores go
            if self._monitor is None or not self._monitor.is_alive():
                self._store = self._monitor_store = None

    def _terminate(self) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGKILL)
        for w in self.workers.values():
            w.kill()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

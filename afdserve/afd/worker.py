"""The two worker processes of AFD and the FFN backend the attention worker plugs into its runner.

Attention worker (global rank 0..x-1): embedding, attention halves, its own requests' KV cache,
router, final norm, LM head and sampling: a `ModelRunner` over a role="attention" model whose
`FFNBackend` is `RemoteFFN`. It takes messages from the engine process over its control channel
(`Step` -> `StepDone`/`Failed`, `Reform` -> `Ready`/`Failed`, `Stop`).
FFN worker (global rank x..x+y-1): dense FFNs, experts and shared expert of its `FFNShard`. Its
loop: for each step, layer and micro-batch, receive from every attention worker, concatenate all
their tokens into one batch, compute, split, send each attention worker its rows back.

Both are started by `afdserve worker` (`afd/cli.py`): local workers as fresh interpreters by the
engine process, which hands them their `WorkerSpec` over the control channel; remote FFN workers
from the command line. Start-up and re-formation go through `rendezvous.py`: claim the rank, a
hello that attention worker 0's is compared with (mismatched roles are refused with the
difference named), load, then the process group of the current generation. When the group
breaks (a peer was lost), an attention worker drops it, reports `Failed(recoverable=True)` and
keeps its KV cache for the engine's `Reform`; an FFN worker drops it and rejoins the next
generation by itself. FFN workers adopt the runtime settings (micro-batches, transfer precision)
of attention worker 0.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from afdserve.afd import rendezvous as rdv
from afdserve.afd.config import AFDConfig
from afdserve.afd.connector import TorchP2PConnector
from afdserve.afd.rendezvous import DeploymentEnded, HandshakeError  # noqa: F401  (re-exported)
from afdserve.afd.topology import Topology
from afdserve.afd.trace import (A2F, ATTENTION, F2A_WAIT, SpanRecorder, StepTrace, ffn_stamps_len, pack_ffn_stamps,
                                unpack_ffn_stamps)
from afdserve.config import Step3Config
from afdserve.engine.executor import CacheConfig, make_kv_cache
from afdserve.engine.runner import ModelRunner, StepInput
from afdserve.model.checkpoint import load_model, parse_dtype
from afdserve.model.kernels import prepare_for_decode
from afdserve.model.step3 import FFNInput
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


# ------------------------------------------------------------------ control messages
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
    message: str
    recoverable: bool = False
    """The worker is alive with its KV cache and waits for `Reform` (its group broke mid-step)."""


# ------------------------------------------------------------------ start-up
def watch_parent(parent_pid: int | None) -> None:
    """Exit this process (without cleanup, which could block on dead peers) when the engine process
    `parent_pid` is gone or this process was re-parented."""
    if not parent_pid:
        return
    first_ppid = os.getppid()

    def alive() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return os.getppid() == first_ppid

    def loop():
        while alive():
            time.sleep(0.25)
        os._exit(3)
    threading.Thread(target=loop, daemon=True, name="afd-parent-watch").start()


class Membership:
    """One worker's place in the deployment: store connection, generation, process group."""

    def __init__(self, spec: WorkerSpec, role: str, index: int):
        afd = spec.afd
        topo = afd.topology
        self.spec, self.role, self.index = spec, role, index
        self.rank = topo.attention_rank(index) if role == "attention" else topo.ffn_rank(index)
        self.who = rdv.describe(role, index)
        self.where = f"{afd.master_addr}:{afd.master_port}"
        self.store = rdv.connect_store(afd.master_addr, afd.master_port, afd.join_timeout_s, self.who)
        rdv.start_heartbeat(afd.master_addr, afd.master_port, self.rank, afd.heartbeat_s, afd.join_timeout_s)
        try:
            self.gen = rdv.current_generation(self.store)
        except Exception:
            raise HandshakeError(f"{self.who}: the engine at {self.where} announced no process group within "
                                 f"{afd.join_timeout_s:g} s") from None
        self.hello: dict | None = None
        self.pg = None

    def enter(self, config: Step3Config) -> AFDConfig:
        """Claim the rank and pass the handshake of the current generation; the deployment's
        settings with attention worker 0's runtime ones."""
        s, afd = self.spec, self.spec.afd
        if self.hello is None:
            self.hello = rdv.make_hello(afd.topology, self.role, self.index, str(parse_dtype(s.dtype)), s.model_dir,
                                        rdv.checkpoint_fingerprint(s.model_dir, config), afd.runtime())
        ref, self.gen = rdv.enter(self.store, self.gen, self.rank, self.hello, self.who, self.where,
                                  afd.join_timeout_s)
        return afd.adopt(ref["settings"])

    def form(self, error: str | None, device: str):
        """Exchange load errors (one failing role stops all), then form the generation's group."""
        topo = self.spec.afd.topology
        first = rdv.exchange_status(self.store, self.gen, self.rank, error, topo)
        if first:
            raise HandshakeError(first)
        self.pg = rdv.make_group(self.store, self.gen, self.rank, topo.world_size, device)
        return self.pg

    def rejoin(self, gen: int, config: Step3Config, device: str):
        self.pg, self.gen = None, gen
        self.enter(config)
        return self.form(None, device)


def _device(spec: WorkerSpec, rank: int) -> str:
    if spec.device == "cuda" and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"   # local ranks share the node's GPUs
    return spec.device


def make_connector(spec: WorkerSpec, afd: AFDConfig, config: Step3Config, device: str) -> TorchP2PConnector:
    f2a = afd.f2a_dtype
    return TorchP2PConnector(afd.topology, config.hidden_size, config.moe_top_k, parse_dtype(spec.dtype), device,
                             a2f=afd.a2f, f2a_dtype=parse_dtype(f2a) if f2a else None,
                             link_latency_ms=afd.link_latency_ms)


def _first_line(exc: BaseException) -> str:
    """The gist of an error: its first line, without gloo's generic advice."""
    text = str(exc)
    return text.splitlines()[0].split(" This is typically caused")[0] if text else type(exc).__name__


# ------------------------------------------------------------------ attention side
class RemoteFFN:
    """FFNBackend of an attention worker: `submit` starts the sends to every FFN worker and posts
    the receives of their partial sums; `collect` waits for them and adds the partials."""

    def __init__(self, conn: TorchP2PConnector, topology: Topology, index: int, num_layers: int,
                 dtype: torch.dtype, timeout_s: float):
        self.conn, self.topo, self.index, self.L = conn, topology, index, num_layers
        self.dtype, self.timeout = dtype, datetime.timedelta(seconds=timeout_s)
        self._pending: dict[tuple[int, int], tuple[list, float]] = {}
        self.trace: StepTrace | None = None
        self._mark = 0.0

    def begin_step(self, num_micro_batches: int) -> None:
        m = num_micro_batches
        self.trace = StepTrace(self.index, 0, m, attn_ms=self._grid(m), wait_ms=self._grid(m), rtt_ms=self._grid(m))
        self.rec = SpanRecorder()           # stage start/end times (afdserve.afd.timeline)
        self._pending.clear()
        self._mark = time.perf_counter()

    def _grid(self, m: int) -> list[list[float]]:
        return [[0.0] * m for _ in range(self.L)]

    def submit(self, layer: int, micro_batch: int, inp: FFNInput) -> None:
        now = time.perf_counter()
        self.trace.attn_ms[layer][micro_batch] += (now - self._mark) * 1e3
        enc = self.conn.encode(layer, micro_batch, self.trace.micro_batches, inp)
        sends = []
        for r in self.topo.ffn_ranks:
            sends += self.conn.send_ffn_input(r, enc)
        # Complete the sends here rather than in collect: a send left in flight is pushed by
        # gloo's I/O thread, which on a machine whose cores are all computing waits for a CPU
        # slice (milliseconds); finishing it now delivers it at once (AFD 1A1F on 2 cores:
        # +11-24% tokens/s, docs/afd.md).
        for work in sends:
            self._wait(work, f"sending layer {layer}, micro-batch {micro_batch} to the FFN workers")
        sent = time.perf_counter()
        self.trace.wait_ms[layer][micro_batch] = (sent - now) * 1e3   # blocked sending
        self.rec.add(ATTENTION, layer, micro_batch, self._mark, now)
        self.rec.add(A2F, layer, micro_batch, now, sent)
        T = inp.x.shape[0]
        recvs = [self.conn.recv_ffn_output(r, micro_batch, T) for r in self.topo.ffn_ranks]
        self._pending[(layer, micro_batch)] = (recvs, now)
        if layer == 0:
            self.trace.num_tokens += T
        self._mark = time.perf_counter()

    def collect(self, layer: int, micro_batch: int) -> torch.Tensor:
        t0 = time.perf_counter()
        recvs, t_sub = self._pending.pop((layer, micro_batch))
        for k, (work, _) in enumerate(recvs):
            if work is not None:
                self._wait(work, f"FFN worker {k}'s result for layer {layer}, micro-batch {micro_batch}")
        y = recvs[0][1]
        for _, buf in recvs[1:]:
            y = y + buf
        t1 = time.perf_counter()
        self.trace.wait_ms[layer][micro_batch] += (t1 - t0) * 1e3
        self.trace.rtt_ms[layer][micro_batch] = (t1 - t_sub) * 1e3
        if recvs[0][0] is not None:          # an empty micro-batch gets no reply to wait for
            self.rec.add(F2A_WAIT, layer, micro_batch, t0, t1)
        self._mark = t1
        return y.to(self.dtype)

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"attention worker {self.index} waiting for {what}: {_first_line(exc)}") from None

    def end_step(self) -> None:
        self.trace.spans = self.rec.take()
        if self.index != 0:
            return
        m = self.trace.micro_batches
        for k, r in enumerate(self.topo.ffn_ranks):
            work, buf = self.conn.recv_trace(r, ffn_stamps_len(self.L, m))
            self._wait(work, f"FFN worker {k}'s step timings")
            ffn_ms, recv_ms, spans = unpack_ffn_stamps(buf, self.L, m)
            self.trace.ffn_ms.append(ffn_ms)
            self.trace.recv_ms.append(recv_ms)
            self.trace.ffn_spans.append(spans)


def attention_worker_main(spec: WorkerSpec, index: int, pipe, parent_pid: int | None) -> int:
    """Entry point of attention worker `index`: join, load, then serve the control channel."""
    watch_parent(parent_pid)
    torch.set_num_threads(max(1, spec.threads))
    try:
        worker = AttentionWorker(spec, index, pipe)
    except Exception as exc:
        pipe.send(Failed(str(exc) if isinstance(exc, HandshakeError) else
                         f"attention worker {index} failed to start: {type(exc).__name__}: {exc}"))
        return 1
    pipe.send(Ready(worker.runner.kv.num_blocks))
    return worker.serve()


class AttentionWorker:
    """A `ModelRunner` over the attention half, fed by the engine; keeps its KV cache across
    re-formations of the process group."""

    def __init__(self, spec: WorkerSpec, index: int, pipe):
        self.spec, self.index, self.pipe = spec, index, pipe
        self.config = Step3Config.from_file(spec.model_dir)
        self.member = Membership(spec, "attention", index)
        afd = self.member.enter(self.config)
        self.device = _device(spec, index)
        err = None
        try:
            dtype = parse_dtype(spec.dtype)
            model = prepare_for_decode(load_model(spec.model_dir, dtype, role="attention", config=self.config,
                                                  device=self.device, quantization=spec.quantization))
            kv = make_kv_cache(self.config, spec.cache, dtype, self.device)
            self.conn = make_connector(spec, afd, self.config, self.device)
            self.backend = RemoteFFN(self.conn, afd.topology, index, self.config.num_hidden_layers, dtype,
                                     afd.timeout_s)
            self.runner = ModelRunner(model, kv, self.backend, afd.micro_batches)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
        self.conn.pg = self.member.form(err, self.device)

    def serve(self) -> int:
        while True:
            try:
                msg = self.pipe.recv()
            except (EOFError, OSError):
                return 0
            if isinstance(msg, Stop):
                _stop_ffn(self.conn, self.spec.afd.topology)
                self.pipe.send(Stop())
                return 0
            if isinstance(msg, Reform):
                self.pipe.send(self._reform(msg.generation))
            else:
                self.pipe.send(self._step(msg))

    def _step(self, msg: Step) -> StepDone | Failed:
        try:
            if msg.micro_batches:
                self.runner.micro_batches = msg.micro_batches
            if msg.a2f:
                self.conn.set_a2f(msg.a2f)
            t0 = time.perf_counter()
            samples = self.runner.execute(msg.step)
            self.backend.trace.step_ms = (time.perf_counter() - t0) * 1e3
            return StepDone(samples, self.backend.trace)
        except Exception as exc:
            # Drop the group at once: FFN workers blocked on this rank see it end and go to rejoin.
            self._drop_group()
            text = str(exc)
            return Failed(text if text.startswith("attention worker") else
                          f"attention worker {self.index}: {type(exc).__name__}: {_first_line(exc)}", recoverable=True)

    def _drop_group(self) -> None:
        self.backend._pending.clear()
        self.conn.pg = self.member.pg = None

    def _reform(self, gen: int) -> Ready | Failed:
        self._drop_group()
        try:
            self.conn.pg = self.member.rejoin(gen, self.config, self.device)
        except Exception as exc:
            return Failed(f"attention worker {self.index} could not join the re-formed group: {_first_line(exc)}")
        return Ready(self.runner.kv.num_blocks)


def _stop_ffn(conn: TorchP2PConnector, topo: Topology) -> None:
    if conn.pg is None:
        return
    works = [conn.send_stop(r) for r in topo.ffn_ranks]
    for w in works:
        try:
            w.wait(datetime.timedelta(seconds=5))
        except RuntimeError:
            pass


# ------------------------------------------------------------------ FFN side
def ffn_worker_main(spec: WorkerSpec, index: int, parent_pid: int | None) -> int:
    """Entry point of FFN worker `index` (local child or `afdserve worker --role ffn`).

    Serves until a stop message; when the group breaks it rejoins the engine's next generation
    (DeploymentEnded when none comes within the join timeout or the engine is gone)."""
    watch_parent(parent_pid)
    torch.set_num_threads(max(1, spec.threads))
    config = Step3Config.from_file(spec.model_dir)
    member = Membership(spec, "ffn", index)
    afd = member.enter(config)
    topo = afd.topology
    device = _device(spec, topo.ffn_rank(index))
    err = None
    try:
        model = prepare_for_decode(load_model(spec.model_dir, parse_dtype(spec.dtype), role="ffn",
                                              shard=topo.ffn_shard(index), config=config, device=device,
                                              quantization=spec.quantization))
        conn = make_connector(spec, afd, config, device)
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
    conn.pg = member.form(err, device)
    with torch.inference_mode():
        while True:
            try:
                serve_ffn(model, conn, topo)
                return 0
            except RuntimeError as exc:        # a peer was lost, or the engine re-forms the group
                print(f"afdserve FFN worker {index}: process group lost ({_first_line(exc)}); rejoining",
                      file=sys.stderr, flush=True)
                conn.pg = member.pg = None
                gen = rdv.wait_generation_after(member.store, member.gen, afd.join_timeout_s)
                conn.pg = member.rejoin(gen, config, device)

def serve_ffn(model, conn: TorchP2PConnector, topo: Topology) -> None:
    """Steps until a stop header: per layer and micro-batch, gather all attention workers' tokens.

    The micro-batch count m of a step comes with its headers (all attention workers agree)."""
    config, L = model.config, len(model.layers)
    top_k = [config.moe_top_k if config.is_moe_layer(i) else 0 for i in range(L)]
    while True:
        times = []                       # times[i][j] = (wait from, received, computed, replied)
        posted: dict[tuple[int, int], list] = {}     # (layer, micro-batch) -> per attention rank
        for i, layer in enumerate(model.layers):
            row, j, m = [], 0, 1
            while j < m:
                t0 = time.perf_counter()
                if (i, j) in posted:
                    msgs = [conn.wait_ffn_input(p) for p in posted.pop((i, j))]
                else:                                     # a step's first layer: header first
                    msgs = [conn.recv_ffn_input(r, j) for r in topo.attention_ranks]
                if any(msg.stop for msg in msgs):
                    return
                m = _check_order(msgs, i, j)
                if i + 1 < L:                             # same tokens, next layer: post ahead
                    posted[(i + 1, j)] = [conn.post_ffn_input(r, i + 1, j, msg.num_tokens, msg.encoding, top_k[i + 1])
                                          for r, msg in zip(topo.attention_ranks, msgs)]
                conn.hold_for_link(max(msg.sent_us for msg in msgs))
                t1 = time.perf_counter()
                works = _compute_and_reply(layer, conn, msgs, topo, j)
                t2 = time.perf_counter()
                # Complete the replies before receiving the next micro-batch, for the reason
                # RemoteFFN.submit does: a send left to gloo's I/O thread waits for a CPU slice.
                for w in works:
                    w.wait()
                row.append((t0, t1, t2, time.perf_counter()))
                j += 1
            times.append(row)
        conn.send_trace(topo.attention_rank(0), pack_ffn_stamps(times)).wait()


def _check_order(msgs, i: int, j: int) -> int:
    m = msgs[0].num_micro_batches
    for a, msg in enumerate(msgs):
        if (msg.layer, msg.micro_batch, msg.num_micro_batches) != (i, j, m):
            raise RuntimeError(f"protocol error: attention worker {a} sent layer {msg.layer} micro-batch "
                               f"{msg.micro_batch}/{msg.num_micro_batches}, expected layer {i} micro-batch {j}/{m}")
    return m


def _compute_and_reply(layer, conn: TorchP2PConnector, msgs, topo: Topology, j: int) -> list:
    live = [msg for msg in msgs if msg.num_tokens]
    if not live:
        return []
    x = torch.cat([msg.x for msg in live]) if len(live) > 1 else live[0].x
    weights = ids = None
    if live[0].ids is not None:
        weights = torch.cat([msg.weights for msg in live])
        ids = torch.cat([msg.ids for msg in live])
    y = layer.ffn_half(FFNInput(x, weights, ids))
    works, off = [], 0
    for a, msg in enumerate(msgs):
        if msg.num_tokens:
            works.append(conn.send_ffn_output(topo.attention_rank(a), j, y[off:off + msg.num_tokens]))
            off += msg.num_tokens
    return works

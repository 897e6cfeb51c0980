"""The two worker processes of AFD and the FFN backend the attention worker plugs into its runner.

Attention worker (global rank 0..x-1): embedding, attention halves, its own requests' KV cache,
router, final norm, LM head and sampling: a `ModelRunner` over a role="attention" model whose
`FFNBackend` is `RemoteFFN`. It takes steps from the engine process over a pipe (`Step` ->
`StepDone`/`Failed`).
FFN worker (global rank x..x+y-1): dense FFNs, experts and shared expert of its `FFNShard`. Its
loop: for each step, layer and micro-batch, receive from every attention worker, concatenate all
their tokens into one batch, compute, split, send each attention worker its rows back.

Start-up, before serving: every rank writes a hello (role, topology, dtype, checkpoint
fingerprint) into the rendezvous store; attention worker 0 compares them and publishes a
verdict, so mismatched roles are refused with a message naming the difference. FFN workers adopt
the runtime settings (micro-batches, transfer precision) of attention worker 0.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from afdserve.afd.connector import TorchP2PConnector
from afdserve.afd.topology import Topology
from afdserve.afd.trace import StepTrace
from afdserve.config import Step3Config
from afdserve.engine.executor import CacheConfig, make_kv_cache
from afdserve.engine.runner import ModelRunner, StepInput
from afdserve.model.checkpoint import load_model, parse_dtype
from afdserve.model.kernels import prepare_for_decode
from afdserve.model.step3 import FFNInput
from afdserve.sampling import Sample


class HandshakeError(RuntimeError):
    """Roles started with different configurations, or a role that never joined."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of one AFD deployment is started with (picklable)."""

    topology: Topology
    model_dir: str
    dtype: str = "float32"
    device: str = "cpu"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    join_timeout_s: float = 120.0
    timeout_s: float = 30.0
    threads: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)
    settings: dict = field(default_factory=dict)
    """Runtime settings set by attention worker 0 and adopted by all: micro_batches, a2f,
    f2a_dtype, link_latency_ms."""


# ------------------------------------------------------------------ pipe messages
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
class Stop:
    pass


@dataclass
class StepDone:
    samples: dict[str, Sample]
    trace: StepTrace


@dataclass
class Failed:
    message: str


# ------------------------------------------------------------------ start-up
def checkpoint_fingerprint(model_dir: str | Path, config: Step3Config) -> str:
    """sha256 of the config and, per weight file, its name, size and first/last MiB of bytes."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            h.update(f.read(2**20))
    return h.hexdigest()


def watch_parent(parent_pid: int | None) -> None:
    """Exit this process (without cleanup, which could block on dead peers) when the engine process
    `parent_pid` is gone or this process was re-parented (its forkserver parent exited)."""
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


def _describe(role: str, index: int) -> str:
    return f"{role} worker {index}"


def _hello(spec: WorkerSpec, role: str, index: int, config: Step3Config) -> dict:
    return {"role": role, "index": index, "topology": str(spec.topology), "pid": os.getpid(),
            "host": os.uname().nodename, "dtype": str(parse_dtype(spec.dtype)), "model_dir": str(spec.model_dir),
            "checkpoint": checkpoint_fingerprint(spec.model_dir, config), "settings": spec.settings}


def _mismatches(ref: dict, other: dict, rank: int, topology: Topology) -> list[str]:
    who = f"{_describe(other['role'], other['index'])} (rank {rank}, pid {other['pid']} on {other['host']})"
    out = []
    if other["topology"] != ref["topology"]:
        out.append(f"{who} was started for topology {other['topology']}, attention worker 0 for {ref['topology']}")
    elif topology.role_of(rank)[0] != other["role"]:
        out.append(f"{who} joined at a rank that topology {ref['topology']} gives a {topology.role_of(rank)[0]} worker")
    if other["dtype"] != ref["dtype"]:
        out.append(f"{who} uses dtype {other['dtype']}, attention worker 0 uses {ref['dtype']}")
    if other["checkpoint"] != ref["checkpoint"]:
        out.append(f"{who} loads a different checkpoint or config ({other['model_dir']}, fingerprint "
                   f"{other['checkpoint'][:12]}) than attention worker 0 ({ref['model_dir']}, {ref['checkpoint'][:12]})")
    return out


def rendezvous(spec: WorkerSpec, role: str, index: int, config: Step3Config) -> dict:
    """Join the deployment: store, handshake (refusing mismatched roles), process group.

    Returns attention worker 0's runtime settings."""
    topo = spec.topology
    rank = topo.attention_rank(index) if role == "attention" else topo.ffn_rank(index)
    join = datetime.timedelta(seconds=spec.join_timeout_s)
    try:
        store = dist.TCPStore(spec.master_addr, spec.master_port, None, rank == 0, timeout=join,
                              wait_for_workers=False)
    except Exception as exc:
        raise HandshakeError(f"{_describe(role, index)} cannot reach the rendezvous at "
                             f"{spec.master_addr}:{spec.master_port}: {exc}") from None
    store.set(f"afd/hello/{rank}", json.dumps(_hello(spec, role, index, config)))
    if rank == 0:
        verdict = _judge(store, spec)
        store.set("afd/verdict", verdict)
        if verdict != "ok":
            _await_readers(store, topo.world_size - 1)   # rank 0 hosts the store: let the others read first
    else:
        try:
            verdict = store.get("afd/verdict").decode()
            store.add("afd/verdict_read", 1)
        except Exception:
            raise HandshakeError(f"{_describe(role, index)}: no verdict from attention worker 0 at "
                                 f"{spec.master_addr}:{spec.master_port} within {spec.join_timeout_s:g} s") from None
    if verdict != "ok":
        raise HandshakeError(verdict)
    ref = json.loads(store.get("afd/hello/0"))
    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    # Long op timeout: FFN workers block in recv while the engine is idle; stalls are detected
    # by the attention side's own per-wait timeout and the engine's step deadline.
    dist.init_process_group(backend, store=store, rank=rank, world_size=topo.world_size,
                            timeout=datetime.timedelta(days=7))
    return ref["settings"]


def _await_readers(store, n: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while store.add("afd/verdict_read", 0) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def _judge(store, spec: WorkerSpec) -> str:
    topo = spec.topology
    ref = json.loads(store.get("afd/hello/0"))
    problems = []
    for rank in range(1, topo.world_size):
        role, index = topo.role_of(rank)
        try:
            other = json.loads(store.get(f"afd/hello/{rank}"))
        except Exception:
            problems.append(f"{_describe(role, index)} (rank {rank}) did not join within {spec.join_timeout_s:g} s "
                            f"(rendezvous {spec.master_addr}:{spec.master_port})")
            break
        problems += _mismatches(ref, other, rank, topo)
    if not problems:
        return "ok"
    return "AFD workers refused to start, configuration mismatch between roles: " + "; ".join(problems)


def _gather_status(error: str | None, world: int) -> list[str | None]:
    """After loading: every rank's load error (or None), so one failing role stops all at start-up."""
    out: list = [None] * world
    dist.all_gather_object(out, error)
    return out


def _first_error(statuses: list[str | None], topo: Topology) -> str | None:
    for rank, err in enumerate(statuses):
        if err:
            role, index = topo.role_of(rank)
            return f"{_describe(role, index)} failed to start: {err}"
    return None


def _device(spec: WorkerSpec, rank: int) -> str:
    if spec.device == "cuda" and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"   # local ranks share the node's GPUs
    return spec.device


def make_connector(spec: WorkerSpec, settings: dict, config: Step3Config, device: str) -> TorchP2PConnector:
    f2a = settings.get("f2a_dtype")
    return TorchP2PConnector(spec.topology, config.hidden_size, config.moe_top_k, parse_dtype(spec.dtype), device,
                             a2f=settings.get("a2f", "model"), f2a_dtype=parse_dtype(f2a) if f2a else None,
                             link_latency_ms=float(settings.get("link_latency_ms", 0.0)))


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
        self.trace.wait_ms[layer][micro_batch] = (time.perf_counter() - now) * 1e3   # blocked sending
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
        self._mark = t1
        return y.to(self.dtype)

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"attention worker {self.index} waiting for {what}: {str(exc).splitlines()[0]}") from None

    def end_step(self) -> None:
        if self.index != 0:
            return
        m = self.trace.micro_batches
        for k, r in enumerate(self.topo.ffn_ranks):
            work, buf = self.conn.recv_trace(r, 2 * self.L * m)
            self._wait(work, f"FFN worker {k}'s step timings")
            t = buf.view(2, self.L, m).tolist()
            self.trace.ffn_ms.append(t[0])
            self.trace.recv_ms.append(t[1])


def attention_worker_main(spec: WorkerSpec, index: int, pipe, parent_pid: int | None) -> None:
    """Entry point of attention worker `index`: join, load, then serve steps from the pipe."""
    watch_parent(parent_pid)
    torch.set_num_threads(max(1, spec.threads))
    try:
        runner, backend, conn = _attention_setup(spec, index)
    except Exception as exc:
        pipe.send(Failed(str(exc) if isinstance(exc, HandshakeError) else
                         f"attention worker {index} failed to start: {exc}\n{traceback.format_exc()}"))
        os._exit(1)
    pipe.send(Ready(runner.kv.num_blocks))
    code = _serve_attention(runner, backend, conn, spec, index, pipe)
    os._exit(code)


def _attention_setup(spec: WorkerSpec, index: int):
    config = Step3Config.from_file(spec.model_dir)
    settings = rendezvous(spec, "attention", index, config)
    device = _device(spec, index)
    err, runner, backend, conn = None, None, None, None
    try:
        dtype = parse_dtype(spec.dtype)
        model = prepare_for_decode(load_model(spec.model_dir, dtype, role="attention", config=config, device=device))
        kv = make_kv_cache(config, spec.cache, dtype, device)
        conn = make_connector(spec, settings, config, device)
        backend = RemoteFFN(conn, spec.topology, index, config.num_hidden_layers, dtype, spec.timeout_s)
        runner = ModelRunner(model, kv, backend, int(settings.get("micro_batches", 3)))
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
    first = _first_error(_gather_status(err, spec.topology.world_size), spec.topology)
    if first:
        raise HandshakeError(first)
    return runner, backend, conn


def _serve_attention(runner: ModelRunner, backend: RemoteFFN, conn: TorchP2PConnector, spec: WorkerSpec,
                     index: int, pipe) -> int:
    while True:
        try:
            msg = pipe.recv()
        except (EOFError, OSError):
            return 0
        if isinstance(msg, Stop):
            _stop_ffn(conn, spec.topology)
            pipe.send(Stop())
            return 0
        try:
            if msg.micro_batches:
                runner.micro_batches = msg.micro_batches
            if msg.a2f:
                conn.set_a2f(msg.a2f)
            t0 = time.perf_counter()
            samples = runner.execute(msg.step)
            backend.trace.step_ms = (time.perf_counter() - t0) * 1e3
            pipe.send(StepDone(samples, backend.trace))
        except Exception as exc:
            pipe.send(Failed(str(exc) if str(exc).startswith("attention worker") else
                             f"attention worker {index}: {type(exc).__name__}: {exc}"))
            return 1


def _stop_ffn(conn: TorchP2PConnector, topo: Topology) -> None:
    works = [conn.send_stop(r) for r in topo.ffn_ranks]
    for w in works:
        try:
            w.wait(datetime.timedelta(seconds=5))
        except RuntimeError:
            pass


# ------------------------------------------------------------------ FFN side
def ffn_worker_main(spec: WorkerSpec, index: int, parent_pid: int | None) -> int:
    """Entry point of FFN worker `index` (local child or `afdserve worker --role ffn`)."""
    watch_parent(parent_pid)
    torch.set_num_threads(max(1, spec.threads))
    config = Step3Config.from_file(spec.model_dir)
    settings = rendezvous(spec, "ffn", index, config)
    device = _device(spec, spec.topology.ffn_rank(index))
    err = None
    try:
        model = prepare_for_decode(load_model(spec.model_dir, parse_dtype(spec.dtype), role="ffn",
                                              shard=spec.topology.ffn_shard(index), config=config, device=device))
        conn = make_connector(spec, settings, config, device)
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
    first = _first_error(_gather_status(err, spec.topology.world_size), spec.topology)
    if first:
        raise HandshakeError(first)
    with torch.inference_mode():
        serve_ffn(model, conn, spec.topology)
    return 0


def serve_ffn(model, conn: TorchP2PConnector, topo: Topology) -> None:
    """Steps until a stop header: per layer and micro-batch, gather all attention workers' tokens.

    The micro-batch count m of a step comes with its headers (all attention workers agree)."""
    config, L = model.config, len(model.layers)
    top_k = [config.moe_top_k if config.is_moe_layer(i) else 0 for i in range(L)]
    while True:
        times = []                       # times[i][j] = (ffn compute ms, receive wait ms)
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
                row.append(((t2 - t1) * 1e3, (t1 - t0 + time.perf_counter() - t2) * 1e3))
                j += 1
            times.append(row)
        t = torch.tensor(times).permute(2, 0, 1)     # [2, L, m]
        conn.send_trace(topo.attention_rank(0), t.flatten()).wait()


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

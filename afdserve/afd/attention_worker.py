"""The attention worker of AFD and the FFN backend it plugs into its runner.

Attention worker (global rank 0..x-1): embedding, attention halves, its own requests' KV cache,
router, final norm, LM head and sampling: a `ModelRunner` over a role="attention" model whose
`FFNBackend` is `RemoteFFN`. It takes messages from the engine process over its control channel
(`protocol.py`: `Step` -> `StepDone`/`Failed`, `Reform` -> `Ready`/`Failed`, `Stop`). When the
process group breaks (a peer was lost) it drops the group, reports `Failed`
and keeps its KV cache for the engine's `Reform`.
"""
from __future__ import annotations

import datetime
import time

import torch

from afdserve.afd.connector import Connector, first_line, make_connector
from afdserve.afd.handshake import HandshakeError, Membership, watch_parent, worker_device
from afdserve.afd.protocol import Failed, Ready, Reform, Step, StepDone, Stop, WorkerSpec
from afdserve.afd.topology import Topology
from afdserve.afd.trace import A2F, ATTENTION, F2A_WAIT, SpanRecorder, StepTrace, ffn_stamps_len, unpack_ffn_stamps
from afdserve.config import Step3Config
from afdserve.engine.executor import make_kv_cache
from afdserve.engine.runner import ModelRunner
from afdserve.model.checkpoint import load_model, parse_dtype
from afdserve.model.kernels import prepare_for_decode
from afdserve.model.step3 import FFNInput


class RemoteFFN:
    """FFNBackend of an attention worker: `submit` sends to every FFN worker and posts the
    receives of their partial sums; `collect` waits for them and adds the partials."""

    def __init__(self, conn: Connector, topology: Topology, index: int, num_layers: int,
                 dtype: torch.dtype, timeout_s: float):
        self.conn, self.topo, self.index, self.L = conn, topology, index, num_layers
        self.dtype, self.timeout = dtype, datetime.timedelta(seconds=timeout_s)
        self.pending: dict[tuple[int, int], tuple[list, float]] = {}
        self.trace: StepTrace | None = None
        self._mark = 0.0

    def begin_step(self, num_micro_batches: int) -> None:
        m = num_micro_batches
        self.trace = StepTrace(self.index, 0, m, attn_ms=self._grid(m), wait_ms=self._grid(m), rtt_ms=self._grid(m))
        self.rec = SpanRecorder()           # stage start/end times (afdserve.afd.timeline)
        self.pending.clear()
        self._mark = time.perf_counter()

    def _grid(self, m: int) -> list[list[float]]:
        return [[0.0] * m for _ in range(self.L)]

    def submit(self, layer: int, micro_batch: int, inp: FFNInput) -> None:
        now = time.perf_counter()
        self.trace.attn_ms[layer][micro_batch] += (now - self._mark) * 1e3
        try:
            self.conn.send_to_ffn(layer, micro_batch, self.trace.micro_batches, inp, self.timeout)
        except RuntimeError as exc:
            raise self._error(f"sending layer {layer}, micro-batch {micro_batch} to the FFN workers", exc) from None
        sent = time.perf_counter()
        self.trace.wait_ms[layer][micro_batch] = (sent - now) * 1e3   # blocked sending
        self.rec.add(ATTENTION, layer, micro_batch, self._mark, now)
        self.rec.add(A2F, layer, micro_batch, now, sent)
        T = inp.x.shape[0]
        self.pending[(layer, micro_batch)] = (self.conn.post_ffn_outputs(micro_batch, T), now)
        if layer == 0:
            self.trace.num_tokens += T
        self._mark = time.perf_counter()

    def collect(self, layer: int, micro_batch: int) -> torch.Tensor:
        t0 = time.perf_counter()
        recvs, t_sub = self.pending.pop((layer, micro_batch))
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
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: BaseException) -> RuntimeError:
        return RuntimeError(f"attention worker {self.index} waiting for {what}: {first_line(exc)}")

    def end_step(self) -> None:
        self.trace.spans = self.rec.take()
        if self.index != 0:
            return
        m = self.trace.micro_batches
        for k, (work, buf) in enumerate(self.conn.recv_ffn_timings(ffn_stamps_len(self.L, m))):
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
        self.device = worker_device(spec, index)
        err = None
        try:
            dtype = parse_dtype(spec.dtype)
            model = prepare_for_decode(load_model(spec.model_dir, dtype, role="attention", config=self.config,
                                                  device=self.device, quantization=spec.quantization))
            kv = make_kv_cache(self.config, spec.cache, dtype, self.device)
            self.conn = make_connector(afd, self.config, dtype, self.device)
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
                self.conn.stop_ffn(datetime.timedelta(seconds=5))
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
                          f"attention worker {self.index}: {type(exc).__name__}: {first_line(exc)}")

    def _drop_group(self) -> None:
        self.backend.pending.clear()
        self.conn.pg = self.member.pg = None

    def _reform(self, gen: int) -> Ready | Failed:
        self._drop_group()
        try:
            self.conn.pg = self.member.rejoin(gen, self.config, self.device)
        except Exception as exc:
            return Failed(f"attention worker {self.index} could not join the re-formed group: {first_line(exc)}")
        return Ready(self.runner.kv.num_blocks)

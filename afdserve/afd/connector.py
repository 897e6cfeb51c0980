"""The A<->F transport: one micro-batch's hidden states plus metadata each way.

A->F message (attention worker -> every FFN worker), per layer and micro-batch:
    header  int64[8]: kind, layer, micro-batch, token count T, send time (us), x encoding, top-k,
            micro-batches in this step (m may change between steps)
    x       [T, H]  hidden states after the post-attention norm: model dtype, or 8-bit codes
    meta    [T, 2k+s] fp32: routing weights (k), global expert ids (k, exact in fp32), and the
            per-token scale (s = 1 in 8-bit mode); absent for a dense layer in full precision
An empty micro-batch (T = 0) sends the header only, so FFN workers stay in lockstep.
F->A message: y [T, H] (partial sum of this FFN worker) in `f2a_dtype`; no header, since the
attention worker knows T. After the last layer of a step each FFN worker sends its timings to
attention worker 0 (`send_timings`).

Matching: gloo point-to-point ops carry a tag; every (micro-batch, slot) pair gets its own tag,
so micro-batches never match each other's buffers, and messages with one tag between one pair
of ranks match in order (layer after layer). NCCL ignores tags and matches in issue order,
which is the same order here.

8-bit A->F (`a2f="8bit"`): FP8 e4m3 with one fp32 scale per token (amax / 448) where
`torch.float8_e4m3fn` exists, else int8 (amax / 127). The relative error per element is at
most 2^-4 (FP8, 3 mantissa bits) or 1/254 of the token's amax (int8); see docs/afd.md.

`link_latency_ms` (benchmarks only) emulates a slower link: an FFN worker holds each A->F message
until its send time + 2 x latency (the whole round trip, charged on the way in), so a FIFO link
with that latency is modelled without delaying the sender.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from afdserve.afd.config import AFDConfig, check_a2f
from afdserve.afd.topology import Topology
from afdserve.config import Step3Config
from afdserve.model.checkpoint import parse_dtype
from afdserve.model.step3 import FFNInput

KIND_DATA, KIND_STOP = 0, 1
ENC_MODEL, ENC_FP8, ENC_INT8 = 0, 1, 2
HEADER_LEN = 8
SLOT_HEADER, SLOT_X, SLOT_META, SLOT_Y, SLOTS = 0, 1, 2, 3, 8
TRACE_TAG = 7          # micro-batch 0's unused slot 7
FP8 = getattr(torch, "float8_e4m3fn", None)


@dataclass
class FFNMessage:
    """One attention worker's share of one FFN micro-batch, as the FFN worker sees it."""

    layer: int
    micro_batch: int
    num_tokens: int
    x: torch.Tensor | None = None          # [T, H] model dtype (decoded)
    weights: torch.Tensor | None = None    # [T, k] fp32
    ids: torch.Tensor | None = None        # [T, k] int64
    sent_us: int = 0
    num_micro_batches: int = 1
    stop: bool = False
    encoding: int = ENC_MODEL


@dataclass
class PostedInput:
    """Receives posted ahead for one attention rank's micro-batch (`post_ffn_input`)."""

    src: int
    expected: tuple           # (kind, layer, micro-batch, tokens, encoding, top-k) of the header
    header: torch.Tensor
    x: torch.Tensor | None
    meta: torch.Tensor | None
    works: list


@dataclass
class Encoded:
    """An A->F micro-batch ready to send to every FFN worker (encoded once)."""

    header: torch.Tensor
    payload: list[tuple[int, torch.Tensor]]   # (slot, tensor)


class Pending(Protocol):
    def wait(self, timeout: datetime.timedelta | None = None) -> object: ...


class Connector(Protocol):
    """What the worker loops need of an A<->F transport (`TorchP2PConnector` implements it).

    Every call is in `layer_order` (engine/schedule.py); an implementation may post receives
    ahead or complete sends early as its transport needs, but the loops do not know how."""

    pg: object
    """The process group of the current generation (None while it is being re-formed)."""

    # attention side
    def set_a2f(self, a2f: str) -> None: ...
    def send_to_ffn(self, layer: int, micro_batch: int, num_micro_batches: int, inp: FFNInput,
                    timeout: datetime.timedelta) -> None:
        """Send one micro-batch's FFN input to every FFN worker; returns once it is on its way."""
    def post_ffn_outputs(self, micro_batch: int, num_tokens: int) -> list[tuple[Pending | None, torch.Tensor]]:
        """Post the receives of every FFN worker's partial sum ([T, H] each; no handle when T = 0)."""
    def recv_ffn_timings(self, n: int) -> list[tuple[Pending, torch.Tensor]]:
        """Attention worker 0, after a step: every FFN worker's `n` timing values."""
    def stop_ffn(self, timeout: datetime.timedelta) -> None:
        """Tell every FFN worker to leave its loop (no-op without a group)."""

    # FFN side
    def recv_from_attention(self, layer: int, micro_batch: int, next_top_k: int | None) -> list[FFNMessage]:
        """Every attention worker's share of (layer, micro-batch), in attention-rank order (a stop
        message ends the loop); `next_top_k`: the same micro-batch's next layer follows (its top-k)."""
    def reply(self, micro_batch: int, msgs: list[FFNMessage], y: torch.Tensor) -> None:
        """Send each attention worker its rows of `y` (the concatenation of the live `msgs`)."""
    def send_timings(self, values: torch.Tensor) -> None:
        """After a step: this FFN worker's timings to attention worker 0."""


def quantize_8bit(x: torch.Tensor, fp8: bool = FP8 is not None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H] -> (codes [T, H] uint8 (FP8 bits) or int8, scales [T] fp32); one scale per token."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1).clamp(min=1e-12)
    if fp8:
        scale = amax / 448.0
        return (xf / scale[:, None]).to(FP8).view(torch.uint8), scale
    scale = amax / 127.0
    return (xf / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantize_8bit(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    vals = codes.view(FP8).float() if codes.dtype == torch.uint8 else codes.float()
    return (vals * scales[:, None]).to(dtype)


def first_line(exc: BaseException) -> str:
    """The gist of a transport error: its first line, without gloo's generic advice."""
    text = str(exc)
    return text.splitlines()[0].split(" This is typically caused")[0] if text else type(exc).__name__


def _tag(micro_batch: int, slot: int) -> int:
    return micro_batch * SLOTS + slot


class TorchP2PConnector:
    """A<->F transfers over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

    The process group must be initialised by the caller; this class only moves tensors.
    """

    def __init__(self, topology: Topology, hidden_size: int, top_k: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", a2f: str = "model", f2a_dtype: torch.dtype | None = None,
                 link_latency_ms: float = 0.0):
        self.topology, self.hidden, self.top_k = topology, hidden_size, top_k
        self.dtype, self.device = dtype, torch.device(device)
        self.f2a_dtype = f2a_dtype or dtype
        self.latency_s = link_latency_ms / 1000.0
        self._pg = None
        self._posted: dict[tuple[int, int], list[PostedInput]] = {}
        self.set_a2f(a2f)

    @property
    def pg(self):
        """The process group to use (`rendezvous.make_group`); None: torch.distributed's default group.
        Replaced when the deployment forms its group again after losing a worker (receives posted
        in the old group are dropped)."""
        return self._pg

    @pg.setter
    def pg(self, group) -> None:
        self._pg = group
        self._posted.clear()

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> Pending:
        return self._pg.send([t], dst, tag) if self._pg is not None else dist.isend(t, dst, tag=tag)

    def _irecv(self, t: torch.Tensor, src: int, tag: int) -> Pending:
        return self._pg.recv([t], src, tag) if self._pg is not None else dist.irecv(t, src, tag=tag)

    def set_a2f(self, a2f: str) -> None:
        """A->F encoding of the messages this side sends: 'model' (model dtype) or '8bit'."""
        self.a2f = check_a2f(a2f)
        self.encoding = ENC_MODEL if a2f == "model" else (ENC_FP8 if FP8 is not None else ENC_INT8)

    # ------------------------------------------------------------ attention side
    def _encode(self, layer: int, micro_batch: int, num_micro_batches: int, inp: FFNInput) -> Encoded:
        """FFN input -> header + payload tensors (quantized in 8-bit mode)."""
        T = inp.x.shape[0]
        k = inp.ids.shape[1] if inp.ids is not None else 0
        header = torch.tensor([KIND_DATA, layer, micro_batch, T, time.time_ns() // 1000, self.encoding, k,
                               num_micro_batches],
                              dtype=torch.int64, device=self.device)
        if T == 0:
            return Encoded(header, [])
        meta = []
        if self.encoding == ENC_MODEL:
            x = inp.x.contiguous()
        else:
            x, scale = quantize_8bit(inp.x, fp8=self.encoding == ENC_FP8)
        if k:
            meta += [inp.weights.float(), inp.ids.float()]
        if self.encoding != ENC_MODEL:
            meta.append(scale[:, None])
        payload = [(SLOT_X, x)]
        if meta:
            payload.append((SLOT_META, torch.cat(meta, dim=1).contiguous()))
        return Encoded(header, payload)

    def _send_ffn_input(self, dst: int, enc: Encoded) -> list[Pending]:
        """Start sending an encoded micro-batch to global rank `dst`; returns the send handles."""
        mb = int(enc.header[2])
        works = [self._isend(enc.header, dst, _tag(mb, SLOT_HEADER))]
        works += [self._isend(t, dst, _tag(mb, slot)) for slot, t in enc.payload]
        return works

    def send_to_ffn(self, layer: int, micro_batch: int, num_micro_batches: int, inp: FFNInput,
                    timeout: datetime.timedelta) -> None:
        enc = self._encode(layer, micro_batch, num_micro_batches, inp)
        sends = []
        for r in self.topology.ffn_ranks:
            sends += self._send_ffn_input(r, enc)
        # Complete the sends here rather than when the reply is collected: a send left in flight
        # is pushed by gloo's I/O thread, which on a machine whose cores are all computing waits
        # for a CPU slice (milliseconds); finishing it now delivers it at once (docs/afd.md).
        for work in sends:
            work.wait(timeout)

    def post_ffn_outputs(self, micro_batch: int, num_tokens: int) -> list[tuple[Pending | None, torch.Tensor]]:
        return [self._recv_ffn_output(r, micro_batch, num_tokens) for r in self.topology.ffn_ranks]

    def _recv_ffn_output(self, src: int, micro_batch: int, num_tokens: int) -> tuple[Pending | None, torch.Tensor]:
        """Post the receive of one FFN worker's partial sum [T, H]; (handle, buffer)."""
        buf = torch.empty(num_tokens, self.hidden, dtype=self.f2a_dtype, device=self.device)
        if num_tokens == 0:
            return None, buf
        return self._irecv(buf, src, _tag(micro_batch, SLOT_Y)), buf

    def stop_ffn(self, timeout: datetime.timedelta) -> None:
        if self._pg is None:
            return
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
        header[0] = KIND_STOP
        works = [self._isend(header, r, _tag(0, SLOT_HEADER)) for r in self.topology.ffn_ranks]
        for w in works:
            try:
                w.wait(timeout)
            except RuntimeError:
                pass

    def recv_ffn_timings(self, n: int) -> list[tuple[Pending, torch.Tensor]]:
        out = []
        for r in self.topology.ffn_ranks:
            buf = torch.empty(n, dtype=torch.float32, device=self.device)
            out.append((self._irecv(buf, r, TRACE_TAG), buf))
        return out

    # ------------------------------------------------------------------ FFN side
    def recv_from_attention(self, layer: int, micro_batch: int, next_top_k: int | None) -> list[FFNMessage]:
        key = (layer, micro_batch)
        if key in self._posted:
            msgs = [self._wait_ffn_input(p) for p in self._posted.pop(key)]
        else:                                     # a step's first layer: header first
            msgs = [self._recv_ffn_input(r, micro_batch) for r in self.topology.attention_ranks]
        if any(msg.stop for msg in msgs):
            self._posted.clear()
            return msgs
        if next_top_k is not None:                # same tokens, next layer: post ahead
            self._posted[(layer + 1, micro_batch)] = [
                self._post_ffn_input(r, layer + 1, micro_batch, msg.num_tokens, msg.encoding, next_top_k)
                for r, msg in zip(self.topology.attention_ranks, msgs)]
        self._hold_for_link(max(msg.sent_us for msg in msgs))
        return msgs

    # gloo matches a send with a receive by a rendezvous: a send whose receive is not posted yet
    # waits for the receiver's "ready" notice, one extra round trip of process wake-ups. So an
    # FFN worker posts the receives of a micro-batch's next layer as soon as it knows their sizes
    # (from this layer's header: T, encoding, and whether the next layer routes experts), and
    # only a step's first layer is received header first.
    def _recv_ffn_input(self, src: int, micro_batch: int) -> FFNMessage:
        """Blocking receive of one attention worker's micro-batch (header, then payload), decoded."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._irecv(header, src, _tag(micro_batch, SLOT_HEADER)).wait()
        kind, layer, mb, T, sent_us, enc, k, m = header.tolist()
        if kind == KIND_STOP:
            return FFNMessage(-1, micro_batch, 0, stop=True)
        msg = FFNMessage(layer, mb, T, sent_us=sent_us, num_micro_batches=m, encoding=enc)
        if T == 0:
            return msg
        x, meta = self._payload_buffers(T, enc, k)
        self._irecv(x, src, _tag(mb, SLOT_X)).wait()
        if meta is not None:
            self._irecv(meta, src, _tag(mb, SLOT_META)).wait()
        return self._decoded(msg, x, meta, enc, k)

    def _post_ffn_input(self, src: int, layer: int, micro_batch: int, num_tokens: int, encoding: int,
                       top_k: int) -> "PostedInput":
        """Post the receives of a micro-batch whose sizes are known (header and payload at once)."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        works = [self._irecv(header, src, _tag(micro_batch, SLOT_HEADER))]
        x = meta = None
        if num_tokens:
            x, meta = self._payload_buffers(num_tokens, encoding, top_k)
            works.append(self._irecv(x, src, _tag(micro_batch, SLOT_X)))
            if meta is not None:
                works.append(self._irecv(meta, src, _tag(micro_batch, SLOT_META)))
        return PostedInput(src, (KIND_DATA, layer, micro_batch, num_tokens, encoding, top_k), header, x, meta, works)

    def _wait_ffn_input(self, posted: "PostedInput") -> FFNMessage:
        """Complete posted receives; the header must be the one the sizes were posted for."""
        posted.works[0].wait()
        kind, layer, mb, T, sent_us, enc, k, m = posted.header.tolist()
        if kind == KIND_STOP:
            return FFNMessage(-1, mb, 0, stop=True)
        if (kind, layer, mb, T, enc, k) != posted.expected:
            raise RuntimeError(f"protocol error: attention rank {posted.src} sent (kind, layer, micro-batch, "
                               f"tokens, encoding, top-k) = {(kind, layer, mb, T, enc, k)}, expected "
                               f"{posted.expected}")
        for w in posted.works[1:]:
            w.wait()
        msg = FFNMessage(layer, mb, T, sent_us=sent_us, num_micro_batches=m, encoding=enc)
        return self._decoded(msg, posted.x, posted.meta, enc, k) if T else msg

    def _payload_buffers(self, T: int, enc: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        xdt = self.dtype if enc == ENC_MODEL else (torch.uint8 if enc == ENC_FP8 else torch.int8)
        x = torch.empty(T, self.hidden, dtype=xdt, device=self.device)
        width = 2 * k + (enc != ENC_MODEL)
        meta = torch.empty(T, width, dtype=torch.float32, device=self.device) if width else None
        return x, meta

    def _decoded(self, msg: FFNMessage, x: torch.Tensor, meta: torch.Tensor | None, enc: int, k: int) -> FFNMessage:
        msg.x = x if enc == ENC_MODEL else dequantize_8bit(x, meta[:, -1].contiguous(), self.dtype)
        if k:
            msg.weights, msg.ids = meta[:, :k].contiguous(), meta[:, k:2 * k].long()
        return msg

    def _hold_for_link(self, sent_us: int) -> None:
        """Emulated link latency: wait until send time + 2 x latency (no-op when latency is 0)."""
        if self.latency_s:
            delay = sent_us / 1e6 + 2 * self.latency_s - time.time()
            if delay > 0:
                time.sleep(delay)

    def reply(self, micro_batch: int, msgs: list[FFNMessage], y: torch.Tensor) -> None:
        works, off = [], 0
        for r, msg in zip(self.topology.attention_ranks, msgs):
            if msg.num_tokens:
                rows = y[off:off + msg.num_tokens].to(self.f2a_dtype).contiguous()
                works.append(self._isend(rows, r, _tag(micro_batch, SLOT_Y)))
                off += msg.num_tokens
        # Complete the replies before receiving the next micro-batch, for the reason
        # `send_to_ffn` does: a send left to gloo's I/O thread waits for a CPU slice.
        for w in works:
            w.wait()

    def send_timings(self, values: torch.Tensor) -> None:
        dst = self.topology.attention_rank(0)
        self._isend(values.float().contiguous(), dst, TRACE_TAG).wait()


def make_connector(afd: AFDConfig, config: Step3Config, dtype: torch.dtype, device: str) -> TorchP2PConnector:
    """The transport of one worker of the deployment `afd` (its A->F and F->A precision, link latency)."""
    f2a = parse_dtype(afd.f2a_dtype) if afd.f2a_dtype else None
    return TorchP2PConnector(afd.topology, config.hidden_size, config.moe_top_k, dtype, device, a2f=afd.a2f,
                             f2a_dtype=f2a, link_latency_ms=afd.link_latency_ms)

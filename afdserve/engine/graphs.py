"""Decode graphs: a decode step recorded once per batch size and replayed without the Python around it.

At batch 1 a decode step of the `small` preset is ~250 kernel calls (GEMMs, norms, RoPE, the MoE,
residual adds, the router's softmax / top-k, KV cache writes) that read ~230 MB of weights in ~7
ms, and the Python that decides and launches them (module calls, kernel-policy checks, tensor
allocation: ~4000 Python calls) adds another ~3 ms. A `DecodeGraph` removes that second part, as
CUDA graphs do on GPUs: the third decode step of a batch size runs normally while every kernel it
launches is recorded with its arguments, and later steps of that batch size only write their new
inputs (token ids, positions, KV slots) into the recorded input tensors and launch the recorded
calls again, over the same tensors, in the same order:

* afdserve's native kernels (afdserve/native) are recorded as (function, arguments): their
  arguments are sizes and the addresses of tensors the graph keeps alive;
* torch operators are recorded at the dispatcher (a `TorchDispatchMode`): in-place ones are
  called again, views are free (they alias recorded tensors), the others recompute into their
  recorded output (through the operator's `out=` overload where it has one);
* attention over the paged cache runs live: its inputs depend on the step (block tables, context
  lengths), so every replay computes it with the step's own metadata into the recorded output:
  through the native kernel called directly (`attention.paged_decode_runner`, the tensors checked
  once at capture), else by calling `paged_attention` and copying its result.

Replay is exact: the same kernels on the same shapes give bitwise the same results. Safety:
a capture is refused (the step runs normally, and so will that batch size) where the forward reads
tensor data back into Python (`.item()`, `.tolist()`, `.numpy()`, data-dependent shapes), since
a replay would repeat the capture's decision; and a graph is used only after its first replay gave
bitwise the logits of a normal forward of the same step (`validate`). `AFDSERVE_DECODE_GRAPHS=0`
(or `ModelRunner(..., graphs=False)`) turns graphs off; `AFDSERVE_DECODE_GRAPHS=check` checks
every replay against a normal forward (tests).

Where they apply (`ModelRunner`): colocated steps where every sequence decodes one token and
samples, one micro-batch, batch sizes up to `MAX_BATCH`; at most `MAX_GRAPHS` batch sizes are
kept (least recently used dropped). Each graph keeps its step's intermediate tensors (batch x a
few MB at most).
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from afdserve.model import attention as attention_mod
from afdserve.model import fp8 as fp8_mod
from afdserve.model import kernels as kernels_mod

log = logging.getLogger("afdserve.graphs")

GRAPHS_ENV = "AFDSERVE_DECODE_GRAPHS"
MAX_BATCH = 64
MAX_GRAPHS = 8
# A batch size is recorded on its CAPTURE_AFTER-th decode step: recording and checking a graph
# cost ~3-4 normal steps, which a batch size seen once or twice (continuous batching passing
# through it) would never pay back.
CAPTURE_AFTER = 3

aten = torch.ops.aten
# Operators whose outputs hold no defined data (the native kernels fill them): nothing to replay.
_UNINITIALISED = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                  aten.new_empty.default, aten.new_empty_strided.default}
# dtype conversions (same device): replayed as a converting copy into the recorded output
_CONVERSIONS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
# Operators whose output shape depends on the data: a replay would keep the capture's shape.
_DATA_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                aten.unique_consecutive.default, aten.unique_dim.default}


class CaptureRefused(RuntimeError):
    """The step cannot be replayed (it reads tensor data back into Python, or shapes follow data)."""


def graphs_mode() -> str:
    """'on' (default), 'off' or 'check', from $AFDSERVE_DECODE_GRAPHS."""
    raw = os.environ.get(GRAPHS_ENV, "on").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw == "check":
        return "check"
    if raw in ("1", "on", "true", "yes", ""):
        return "on"
    raise ValueError(f"{GRAPHS_ENV}={raw!r}: use on, off or check")


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


_out_overloads: dict = {}


def _out_overload(func):
    """The `out=` overload of a functional operator with the same arguments, and its out names."""
    if func in _out_overloads:
        return _out_overloads[func]
    found = None
    names = [a.name for a in func._schema.arguments]
    for name in func.overloadpacket.overloads():
        ov = getattr(func.overloadpacket, name)
        args = ov._schema.arguments
        outs = [a.name for a in args if a.is_out]
        if outs and [a.name for a in args if not a.is_out] == names:
            found = (ov, outs)
            break
    _out_overloads[func] = found
    return found


def _replay_op(func, args, kwargs, out) -> Callable[[], None] | None:
    """What a replay does for one dispatched operator (None: nothing)."""
    if func in _DATA_SHAPED:
        raise CaptureRefused(f"{func} has a data-dependent shape")
    flat_out = [t for t in tree_flatten(out)[0]]
    if any(not isinstance(t, (torch.Tensor, type(None))) for t in flat_out):
        raise CaptureRefused(f"{func} returns data to Python")
    if func._schema.is_mutable:                                   # in place (index_copy_, copy_, add_)
        op = func._op                                             # the C++ operator: no Python frame
        return lambda: op(*args, **kwargs)
    if func in _UNINITIALISED:
        return None
    outs = [t for t in flat_out if isinstance(t, torch.Tensor)]
    ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if not outs or _storages(outs) <= _storages(ins):             # views / aliases of the inputs
        return None
    if func in _CONVERSIONS and isinstance(args[0], torch.Tensor) and args[0].device == outs[0].device:
        src, dst = args[0], outs[0]                               # .to(dtype) / .float(): a converting copy
        return lambda: dst.copy_(src)
    found = _out_overload(func)
    if found is not None and len(found[1]) == len(outs):
        op, out_kw = found[0]._op, dict(zip(found[1], outs))
        return lambda: op(*args, **kwargs, **out_kw)

    def recompute():
        fresh = [t for t in tree_flatten(func(*args, **kwargs))[0] if isinstance(t, torch.Tensor)]
        for dst, src in zip(outs, fresh):
            dst.copy_(src)
    return recompute


class _Recorder(TorchDispatchMode):
    """Records the operators of the capture thread (others pass through: none should run)."""

    def __init__(self, graph: "DecodeGraph"):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        g = self.graph
        if g.live_depth == 0:
            g.keep.append((args, kwargs, out))
            ins = _storages(tree_flatten((args, kwargs))[0])
            g.created.extend(t for t in tree_flatten(out)[0]
                             if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins)
            op = _replay_op(func, args, kwargs, out)
            if op is not None:
                g.ops.append(op)
        return out


class _NativeProxy:
    """Stands in for a native extension module (or one of its functions) during a capture."""

    def __init__(self, graph: "DecodeGraph", target):
        self._graph, self._target = graph, target

    def __getattr__(self, name):
        fn = getattr(self._target, name)
        if not callable(fn) or name in ("available", "features", "bf16_available"):
            return fn
        return _NativeProxy(self._graph, fn)

    def __call__(self, *args):
        g = self._graph
        result = self._target(*args)
        if g.live_depth == 0:
            fn = self._target
            g.ops.append(lambda: fn(*args))
        return result


class DecodeGraph:
    """One batch size's recorded decode step (forward + logits of every row)."""

    def __init__(self, batch: int):
        self.batch = batch
        self.ops: list[Callable[[], None]] = []
        self.keep: list = []                 # every tensor the recorded calls touch, kept alive
        self.created: list = []              # ... of which the ones made during the capture
        self.live_depth = 0
        self.validated = False
        self.ids = self.positions = self.slots = self.logits = None
        self._meta = None                    # the replayed step's metadata, for the live attention

    # ------------------------------------------------------------------ capture
    def capture(self, forward: Callable, ids: torch.Tensor, meta) -> torch.Tensor:
        """Run `forward(ids, meta)` -> logits once, recording it; returns this step's logits."""
        self.ids, self.positions, self.slots = ids, meta.positions, meta.slot_mapping
        patches = self._patches()
        thread = threading.get_ident()
        saved = {(obj, name): getattr(obj, name) for obj, name, _ in patches}
        for obj, name, value in patches:
            setattr(obj, name, value)
        guards = {m: getattr(torch.Tensor, m) for m in ("tolist", "numpy")}

        def refuse(method):
            original = guards[method]

            def guarded(t, *a, **k):
                if threading.get_ident() == thread and self.live_depth == 0:
                    raise CaptureRefused(f"the forward reads tensor data into Python (.{method}())")
                return original(t, *a, **k)
            return guarded
        for m in guards:
            setattr(torch.Tensor, m, refuse(m))
        try:
            with _Recorder(self):
                self.logits = forward(ids, meta)
        finally:
            for m, f in guards.items():
                setattr(torch.Tensor, m, f)
            for (obj, name), value in saved.items():
                setattr(obj, name, value)
        return self.logits

    def _patches(self) -> list[tuple]:
        k, fp8 = kernels_mod, fp8_mod
        patches = [(attention_mod, "paged_attention", self._live_attention(attention_mod.paged_attention))]
        for name in ("_native", "_bgemm", "_sgemm", "_attention_kernel"):
            if getattr(k, name, None) is not None:
                patches.append((k, name, _NativeProxy(self, getattr(k, name))))
        if fp8._NATIVE is not None:
            patches.append((fp8, "_NATIVE", _NativeProxy(self, fp8._NATIVE)))
        return patches

    def _live_attention(self, real: Callable) -> Callable:
        def live(q, k_cache, v_cache, meta, *rest, **kw):
            self.live_depth += 1
            try:
                out = real(q, k_cache, v_cache, meta, *rest, **kw)
                # the native kernel called straight into `out` with each step's tables and lengths,
                # without the Python of the whole call; else the whole call, copied
                direct = attention_mod.paged_decode_runner(q, k_cache, v_cache, meta, *rest, out=out, **kw)
            finally:
                self.live_depth -= 1
            self.keep.append((q, k_cache, v_cache, out))

            def again():
                if direct is None or not direct(self._meta):
                    out.copy_(real(q, k_cache, v_cache, self._meta, *rest, **kw))
            self.ops.append(again)
            return out
        return live

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors made during the capture that the graph keeps (its intermediates)."""
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.created}.values())

    # ------------------------------------------------------------------ replay
    def replay(self, ids: torch.Tensor, meta) -> torch.Tensor:
        """The logits of a step with these inputs (same batch size), from the recorded calls."""
        self.ids.copy_(ids)
        self.positions.copy_(meta.positions)
        self.slots.copy_(meta.slot_mapping)
        self._meta = meta.select(slice(0, self.batch))
        try:
            for op in self.ops:
                op()
        finally:
            self._meta = None
        return self.logits


class DecodeGraphs:
    """The graphs of one `ModelRunner`, by batch size; `run` returns None where none applies."""

    def __init__(self, forward: Callable, mode: str | None = None):
        self.forward = forward
        self.mode = mode or graphs_mode()
        self.graphs: OrderedDict[int, DecodeGraph] = OrderedDict()
        self.refused: dict[int, str] = {}
        self.seen: dict[int, int] = {}          # decode steps per batch size not yet recorded
        self.replays = 0

    def run(self, ids: torch.Tensor, meta) -> torch.Tensor | None:
        S = len(meta.query_lens)
        if self.mode == "off" or S > MAX_BATCH or S in self.refused:
            return None
        g = self.graphs.get(S)
        if g is None:
            self.seen[S] = self.seen.get(S, 0) + 1
            if self.seen[S] < CAPTURE_AFTER:
                return None
            del self.seen[S]
            return self._capture(S, ids, meta)
        self.graphs.move_to_end(S)
        if g.validated and self.mode != "check":
            try:
                logits = g.replay(ids, meta)
            except Exception as exc:              # never expected; the step must not fail for it
                return self._fall_back(g, ids, meta, f"its replay failed ({type(exc).__name__}: {exc})")
            self.replays += 1
            return logits
        return self._validate(g, ids, meta)

    def _capture(self, S: int, ids: torch.Tensor, meta) -> torch.Tensor:
        g = DecodeGraph(S)
        try:
            logits = g.capture(self.forward, ids.clone(), meta)
        except CaptureRefused as exc:
            self._refuse(S, str(exc))
            return self.forward(ids, meta)
        except Exception as exc:
            # The normal forward first: if the step itself is bad, its error is the step's (and
            # the batch size keeps its chance of a graph); else the recording is what failed.
            logits = self.forward(ids, meta)
            self._refuse(S, f"recording it failed ({type(exc).__name__}: {exc})")
            return logits
        self.graphs[S] = g
        log.debug("decode graph for batch %d: %d calls, %.1f MiB of intermediates", S, len(g.ops), g.nbytes / 2**20)
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return logits

    def _validate(self, g: DecodeGraph, ids: torch.Tensor, meta) -> torch.Tensor:
        """Replay, then the normal forward of the same step (it rewrites the same KV slots with the
        same values): the graph is kept only if both logits are bitwise equal."""
        try:
            replayed = g.replay(ids, meta).clone()
        except Exception as exc:
            return self._fall_back(g, ids, meta, f"its replay failed ({type(exc).__name__}: {exc})")
        logits = self.forward(ids, meta)
        if torch.equal(replayed, logits):
            g.validated = True
        else:
            del self.graphs[g.batch]
            self._refuse(g.batch, "its replay differed from the normal forward")
        return logits

    def _fall_back(self, g: DecodeGraph, ids: torch.Tensor, meta, why: str) -> torch.Tensor:
        """The step's normal forward (a partial replay wrote the same KV slots the forward rewrites),
        and the batch size without a graph from now on."""
        logits = self.forward(ids, meta)
        self.graphs.pop(g.batch, None)
        self._refuse(g.batch, why)
        return logits

    def _refuse(self, S: int, why: str) -> None:
        self.refused[S] = why
        log.warning("decode graphs: batch %d runs without a graph: %s", S, why)

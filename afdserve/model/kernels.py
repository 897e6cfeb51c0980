"""Weight layouts and the linear / attention kernel choice for decoding.

A decode step multiplies a few rows (one per sequence, or per token an expert receives) by every
weight matrix, so its GEMMs read weights rather than compute, and which kernel reads a matrix
fastest depends on the row count and on how the matrix is laid out. Measured with one thread on
the 2-core CPU the benchmarks run on (`python benchmarks/kernel_bench.py`, figures in
benchmarks/README.md):

* afdserve's own kernels (`afdserve._native`, afdserve/native/decode_kernels.c, compiled at
  install time where a C compiler is present; x86-64 with AVX2/FMA) read each weight byte once
  for any row count: over the checkpoint layout [out, in] they match or beat every BLAS on that
  layout up to 32 rows (1.05-1.8x the best BLAS candidate of any layout at 2-8 rows), over
  transposed storage [in, out] up to 8 rows (at 1 row within 10% of OpenBLAS's GEMV); beyond
  that numpy's OpenBLAS (threadpoolctl holds it to one thread) is as fast or faster. They are
  used with one torch thread: they are single-threaded, and with more threads torch's BLAS uses
  the cores.
* Without them, with one thread: numpy's OpenBLAS for 1 and 4+ rows (1.0-1.4x MKL/oneDNN), MKL
  for 2-3 rows, over transposed storage except for strongly narrow matrices (in >= 2 out), whose
  one-row GEMV is faster in the checkpoint layout.
* With more threads: MKL over transposed storage for 1-3 rows of wide matrices (1.3-1.7x the
  checkpoint layout), oneDNN's inner product over transposed storage for 4+ rows, and for the
  LM head (32000 outputs) a oneDNN-prepacked copy (2-2.5x MKL at 8-64 rows; the only matrix kept
  twice). OpenBLAS is not used then: its thread pool and torch's fight for the cores.

`prepare_for_decode(model)` applies this once after loading:
  1. fuses projections that read the same input: q_proj/k_proj/v_proj into one matrix, and
     gate_proj/up_proj of every dense FFN, shared expert and routed expert into one [2W, H]
     matrix (one GEMM instead of two or three). The checkpoint parameters become views into the
     fused storage, so the state dict, the memory used and the reference code paths are unchanged;
  2. on CPU in fp32: stores matrices transposed as `stored_transposed` says (the wide ones: fused
     gate/up projections, wq, the experts' down projections when hidden > width, the LM head) and
     prepacks the LM head for oneDNN.

`linear(x, w)` picks the kernel from the row count, the weight's layout and the thread count; it
equals `F.linear(x, w)` up to floating-point summation order (tests/test_kernels.py).
`native_decode_attention` is the decode attention that reads K/V in place from the paged cache
(afdserve/model/attention.py uses it with one thread and falls back to gather + SDPA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to these many rows MKL (over transposed storage) beats oneDNN; from PACKED_ROWS on a prepacked
# copy wins (benchmarks/kernel_bench.py).
MKL_MAX_ROWS = 3
PACKED_ROWS = 3


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()
# OpenBLAS is used for 1 row and from this many rows on (2-3 rows: MKL is faster).
OPENBLAS_MIN_ROWS = 4


def _openblas_available() -> bool:
    """numpy's own OpenBLAS (the one its wheels bundle), limited to one thread (it is only used
    when torch has one too). Other BLAS libraries in the process, torch's included, are left alone."""
    try:
        import numpy  # noqa: F401  (loads the library threadpoolctl looks for)
        from threadpoolctl import threadpool_info, threadpool_limits
        ours = [i for i in threadpool_info()
                if i.get("internal_api") == "openblas" and "numpy" in i.get("filepath", "")]
        if not ours:
            return False
        threadpool_limits({i["prefix"]: 1 for i in ours})
        return True
    except Exception:                                  # pragma: no cover - no numpy / threadpoolctl
        return False


OPENBLAS = _openblas_available()


def _native_available() -> bool:
    """afdserve's own decode GEMMs (afdserve/native/decode_kernels.c), built at install time where a C
    compiler is present, and runnable on this CPU (x86-64 with AVX2 + FMA)."""
    try:
        from afdserve import _native
        return bool(_native.available())
    except Exception:                                  # not built, or another platform
        return False


NATIVE = _native_available()
if NATIVE:
    from afdserve._native import decode_attention as _attention_kernel
    from afdserve._native import sgemm as _sgemm
# Rows up to which the native kernels beat the BLAS libraries, per layout (benchmarks/kernel_bench.py).
NATIVE_MAX_ROWS = 32          # checkpoint layout [out, in]
NATIVE_MAX_ROWS_T = 8         # transposed storage [in, out]


def one_thread_mode() -> bool:
    """True where `linear` uses its one-thread kernels (native, OpenBLAS) for CPU rows: one of them
    is present and torch runs one thread. The weight layouts follow (`stored_transposed`)."""
    return (NATIVE or OPENBLAS) and torch.get_num_threads() == 1


def _openblas_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ w^T for w [out, in], stored transposed or not: one sgemm over w's memory."""
    return torch.from_numpy(x.numpy() @ w.t().numpy())


def _native_layout(w: torch.Tensor) -> tuple[int, bool] | None:
    """(leading dimension, transposed) of a 2-D weight [out, in] the native kernels can read: unit
    stride along `out` (transposed storage) or along `in` with rows not overlapping (checkpoint
    layout, fused-matrix slices included); None for any other strides."""
    s0, s1 = w.stride()
    if s0 == 1 and s1 != 1:
        return s1, True
    n, k = w.shape
    if s1 == 1 and (n == 1 or s0 >= k):
        return (s0 if n > 1 else k), False
    return None


def _native_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ w^T with the native kernel; w [out, in] in a layout `_native_layout` accepts,
    fp32 on the CPU."""
    layout = _native_layout(w)
    if layout is None:
        raise ValueError(f"the native kernels cannot read a weight with strides {w.stride()}")
    return _native_call(x, w, *layout)


def _native_call(x: torch.Tensor, w: torch.Tensor, ldw: int, transposed: bool) -> torch.Tensor:
    rows, k = x.shape
    if w.shape[1] != k or not (rows and k and w.shape[0]):
        return F.linear(x, w)                          # torch's shape error, or an empty product
    xs0, xs1 = x.stride()
    if xs1 != 1 or (rows > 1 and xs0 < k):
        x, xs0 = x.contiguous(), k
    n = w.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    _sgemm(x.data_ptr(), xs0 if rows > 1 else k, w.data_ptr(), ldw, y.data_ptr(), n, rows, n, k, transposed)
    return y


def native_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: list[int], block_size: int,
                            scale: float) -> torch.Tensor | None:
    """Decode attention (one new token per sequence) straight from the paged cache with the native
    kernel, or None where it does not apply (not built, more than one torch thread, not fp32 on
    the CPU, autograd needed). q [S, n_q, d]; k_cache, v_cache [slots, g, d]; block_tables
    [S, max_blocks]; context_lens [S] (new token included). No K/V is copied: each block's keys
    and values are read where they lie."""
    if not NATIVE or torch.get_num_threads() != 1 or q.dim() != 3 or k_cache.dim() != 3:
        return None
    tensors = (q, k_cache, v_cache)
    if any(not t.is_cpu or t.dtype is not torch.float32 for t in tensors) or \
            (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or \
            not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape != v_cache.shape:
        return None
    S, nq, d = q.shape
    slots, g, dk = k_cache.shape
    if dk != d or slots % block_size or len(context_lens) != S or block_tables.shape[0] != S:
        raise ValueError(f"decode attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, "
                         f"{len(context_lens)} context lengths, block tables {tuple(block_tables.shape)} disagree")
    if S == 0:
        return q.new_empty(q.shape)
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = torch.tensor(context_lens, dtype=torch.int64)
    out = torch.empty_like(q)
    _attention_kernel(q.data_ptr(), S, nq, d, k_cache.data_ptr(), v_cache.data_ptr(), slots // block_size,
                      g, block_size, tables.data_ptr(), tables.shape[1], lens.data_ptr(), float(scale), out.data_ptr())
    return out


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")


def is_transposed(w: torch.Tensor) -> bool:
    """True for a 2-D [out, in] weight whose memory is [in, out] row-major."""
    return w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1


def linear(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ w[out, in]^T with the fastest kernel for M and w's layout.

    `packed` is an optional oneDNN-prepacked copy of w (see `prepack`), used from PACKED_ROWS rows.
    A weight that is not a tensor (a quantized weight, afdserve/model/fp8.py) computes its own product.
    """
    if not isinstance(w, torch.Tensor):
        return w.linear(x)
    if x.is_cpu and x.dtype is torch.float32 and x.dim() == 2 and \
            not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):   # no autograd below
        rows = x.shape[0]
        if NATIVE and rows and w.dtype is torch.float32 and w.is_cpu and w.dim() == 2 and \
                torch.get_num_threads() == 1:
            layout = _native_layout(w)
            if layout is not None and rows <= (NATIVE_MAX_ROWS_T if layout[1] else NATIVE_MAX_ROWS):
                return _native_call(x, w, *layout)
        if OPENBLAS and (rows == 1 or rows >= OPENBLAS_MIN_ROWS) and w.dim() == 2 and \
                (is_transposed(w) or w.is_contiguous()) and torch.get_num_threads() == 1:
            return _openblas_linear(x, w)
        if not ONEDNN:
            return F.linear(x, w)
        if packed is not None and rows >= PACKED_ROWS:
            return _onednn_linear(x, packed)
        if rows > MKL_MAX_ROWS and is_transposed(w):
            return _onednn_linear(x, w)
    return F.linear(x, w)


def prepack(w: torch.Tensor, rows_hint: int = 8) -> torch.Tensor | None:
    """A oneDNN-prepacked copy of a CPU fp32 weight [out, in], or None where oneDNN is absent."""
    if not ONEDNN or w.device.type != "cpu" or w.dtype != torch.float32:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows_hint)


def _fuse_rows(params: list[nn.Parameter], transpose: bool) -> torch.Tensor:
    """Concatenate [.., out_i, in] parameters along `out` into one tensor, rebind each parameter to
    its slice (a view), and return the fused [.., sum(out), in] tensor (a view of [.., in, sum(out)]
    memory when `transpose`)."""
    fused = torch.cat([p.detach() for p in params], dim=-2)
    if transpose:
        fused = fused.transpose(-1, -2).contiguous().transpose(-1, -2)
    start = 0
    for p in params:
        n = p.shape[-2]
        p.data = fused[..., start:start + n, :]
        start += n
    return fused


def _cpu_fp32(p: torch.Tensor) -> bool:
    return p.device.type == "cpu" and p.dtype == torch.float32


def stored_transposed(out: int, inp: int) -> bool:
    """Whether `prepare_for_decode` stores a CPU fp32 [out, inp] matrix transposed, with the
    current thread count and kernels: the wide ones (out > inp), which every kernel streams faster
    transposed at few rows; with one thread and OpenBLAS but no native kernels, also every matrix
    but the strongly narrow ones (inp >= 2 out, e.g. o_proj and dense down projections), because
    OpenBLAS's small-M sgemm is faster over transposed storage while its one-row GEMV is faster
    over the checkpoint layout for those (benchmarks/kernel_bench.py)."""
    return out > inp or (one_thread_mode() and not NATIVE and inp < 2 * out)


@torch.no_grad()
def prepare_for_decode(model: nn.Module) -> nn.Module:
    """Fuse projections and pick CPU layouts in place (see the module docstring); returns model."""
    from afdserve.model.attention import MFAttention
    from afdserve.model.layers import MoE, SwiGLU

    def transpose(p: torch.Tensor, out: int | None = None) -> bool:
        """Store p ([.., out, in]; `out` overrides its row count, for fused matrices) transposed?"""
        return _cpu_fp32(p) and stored_transposed(p.shape[-2] if out is None else out, p.shape[-1])

    for mod in model.modules():
        if getattr(mod, "gate_up", None) is not None or getattr(mod, "qkv_a", None) is not None:
            continue                                   # already prepared
        if isinstance(mod, MFAttention):
            qkv = [mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight]
            mod.qkv_a = _fuse_rows(qkv, transpose(qkv[0], sum(p.shape[0] for p in qkv)))
            for p in (mod.wq.weight, mod.o_proj.weight):
                if transpose(p):
                    _fuse_rows([p], True)
        elif (isinstance(mod, SwiGLU) and mod.gate_proj.weight.shape[0]) or \
                (isinstance(mod, MoE) and hasattr(mod, "gate_proj") and mod.num_local):
            p = [mod.gate_proj.weight, mod.up_proj.weight]
            mod.gate_up = _fuse_rows(p, transpose(p[0], 2 * p[0].shape[-2]))
            if transpose(mod.down_proj.weight):        # e.g. experts' [hidden, width] down
                _fuse_rows([mod.down_proj.weight], True)
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(model, "lm_head_packed", None) is None and _cpu_fp32(head.weight):
        model.lm_head_packed = prepack(head.weight)
        if transpose(head.weight):
            _fuse_rows([head.weight], True)
    return model

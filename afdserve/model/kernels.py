"""Weight layouts, the kernel policy, and the linear / attention kernels of decoding.

A decode step multiplies a few rows (one per sequence, or per token an expert receives) by every
weight matrix, so its GEMMs read weights rather than compute, and which kernel reads a matrix
fastest depends on the dtype, the row count, the layout and the thread count. That choice is made
ONCE per process, when a model is prepared (`prepare_for_decode`, after the worker has set its
thread count): `decide_policy()` returns a frozen `KernelPolicy` (logged on the `afdserve.kernels`
logger), `use_policy` installs it, and `linear` / `native_decode_attention` read its fields without
re-deriving anything per call. `--kernels auto|native|torch` (or AFDSERVE_KERNELS) selects:

* auto: the measured choice below (docs/kernels.md has the tables);
* native: afdserve's own kernels for every few-row GEMM (<= FORCED_NATIVE_ROWS rows) and decode
  attention they can run (an error where they are not built);
* torch: torch's kernels only (MKL / oneDNN GEMMs, gather + SDPA attention), the reference.

Shape classes and kernels (auto):
* few-row GEMM, checkpoint layout [out, in] and transposed storage [in, out]: afdserve._native
  (afdserve/native/decode_kernels.c fp32, gemm_bf16.c bf16; x86-64 with AVX2/FMA, compiled at
  install where a C compiler is present). They read every weight byte once at any row count and
  split the outputs over torch's thread count with OpenMP in torch's own libgomp (one runtime and
  one thread pool in the process; checked at load, `openmp_runtimes`). bf16 weights are read at
  half the bytes: widened by a shift on AVX2, or multiplied in pairs by `vdpbf16ps` where the CPU
  has AVX512-BF16 (chosen at run time). Up to `native_rows[(dtype, transposed)]` rows;
* many-row GEMM (prefill, large batches): torch: oneDNN / MKL (bf16 through oneDNN, which uses
  AMX or AVX512-BF16 where present), a oneDNN-prepacked LM head in fp32, and with one fp32
  thread numpy's OpenBLAS where it measured faster;
* decode attention over the paged cache: the native kernel (fp32 or bf16 cache, read in place,
  sequences x heads over the threads), else gather + SDPA.

`prepare_for_decode(model)` also fuses projections that read the same input (q/k/v; gate/up of
every FFN and expert: the parameters become views of the fused storage, same memory) and, in fp32,
stores the wide matrices transposed as `stored_transposed` says, and prepacks the LM head.
`linear(x, w)` equals `F.linear(x, w)` up to floating-point summation order (tests/test_kernels.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.model import fp8

log = logging.getLogger("afdserve.kernels")

KERNEL_MODES = ("auto", "native", "torch")
KERNELS_ENV = "AFDSERVE_KERNELS"
FORCED_NATIVE_ROWS = 64          # `native` mode: few-row GEMMs up to this many rows
# fp32 with torch's kernels: up to MKL_MAX_ROWS rows MKL (over transposed storage) beats oneDNN;
# from PACKED_ROWS on the prepacked LM head wins; OpenBLAS (one thread) for 1 and 4+ rows.
MKL_MAX_ROWS = 3
PACKED_ROWS = 3
OPENBLAS_MIN_ROWS = 4
ISA_AVX2, ISA_AVX512BF16, ISA_AVX512BF16_PACKED = 1, 2, 3  # afdserve._native.bgemm's `isa`
# auto: rows up to which the native kernels beat torch's, per (dtype, transposed storage) and
# one thread / more (benchmarks/kernel_bench.py; docs/kernels.md).
AUTO_NATIVE_ROWS = {
    1: {(torch.float32, False): 32, (torch.float32, True): 8,
        (torch.bfloat16, False): 8, (torch.bfloat16, True): 4},
    2: {(torch.float32, False): 32, (torch.float32, True): 8,
        (torch.bfloat16, False): 8, (torch.bfloat16, True): 4},
}

# bf16 over the checkpoint layout: vdpbf16ps up to this many rows, the AVX2 kernel above it.
AUTO_BF16DP_ROWS = 4
# ... and above AUTO_BF16DP_ROWS, up to this many rows, vdpbf16ps over weights repacked per 32
# outputs (gemm_bf16.c): 1.2-1.9x oneDNN's bf16 GEMM from 5 to 64 rows, even with it at 256, a
# few % behind it in prefill-sized products (benchmarks/kernel_bench.py; docs/kernels.md).
AUTO_BF16_PACKED_ROWS = 256
# The native MoE (moe.c) takes the repacked kernel to any row count in `auto`: from 256 rows on it
# is within 0-8% of oneDNN's GEMM, and one call saves the Python path's grouping, gathers and
# scatters of a prefill's thousands of (token, expert) rows.
AUTO_MOE_ROWS = 1 << 30


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


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


def _native_features() -> dict:
    """afdserve._native's {avx2, avx512bf16, openmp} on this CPU; {} where it is not built or
    cannot run (x86-64 with AVX2 + FMA)."""
    try:
        from afdserve import _native
        return dict(_native.features()) if _native.available() else {}
    except Exception:                                  # not built, or another platform
        return {}


ONEDNN = _onednn_available()
OPENBLAS = _openblas_available()
FEATURES = _native_features()
NATIVE = bool(FEATURES)
if NATIVE:
    from afdserve import _native
    from afdserve._native import bgemm as _bgemm
    from afdserve._native import decode_attention as _attention_kernel
    from afdserve._native import sgemm as _sgemm


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (one expected: torch's libgomp)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/lib" in line}
    except OSError:                                    # not Linux: nothing to check
        return []
    return sorted(p for p in paths if any(n in os.path.basename(p) for n in ("libgomp", "libiomp", "libomp")))


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16_arithmetic() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 products at the rate of fp32 ones or faster."""
    return bool(FEATURES.get("avx512bf16")) or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str, checkpoint_dtype: str | None = None, device: str | None = None) -> str:
    """The run's dtype name for `name`; 'auto' (the default of generate / serve / demo / LLM):
    bfloat16 on CUDA; on the CPU bfloat16 when the checkpoint is stored in bf16 / fp16 (bf16
    halves the bytes every decode step streams, and fp32 would not add precision the weights do
    not have) or when the CPU has bf16 arithmetic (AVX512-BF16, AMX), float32 otherwise (an fp32
    checkpoint on a CPU without bf16 arithmetic: torch's bf16 paths there emulate the products,
    which loses more in prefill than the half bytes win in decode; docs/kernels.md). Explicit
    names pass through (checked by checkpoint.parse_dtype where they are used)."""
    if name != "auto":
        return name
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return "bfloat16"
    if checkpoint_dtype in ("bfloat16", "float16", "bf16", "fp16") or cpu_has_bf16_arithmetic():
        return "bfloat16"
    return "float32"


def apply_kernels_argument(args) -> None:
    """Install the `--kernels` choice (afdserve/commands.py) for this process and the workers it starts (they inherit
    the environment, and decide their own policy for their thread count at load)."""
    mode = getattr(args, "kernels", None)
    if mode:
        os.environ[KERNELS_ENV] = kernel_mode(mode)
        use_policy(decide_policy(mode))


@dataclass(frozen=True)
class KernelPolicy:
    """Which kernel runs each shape class, decided once per process (`decide_policy`)."""

    mode: str = "torch"
    threads: int = 1
    native_rows: dict = field(default_factory=dict)  # (dtype, transposed) -> most rows for native GEMMs
    bf16_isa: int = 0                                # ISA_AVX2 / ISA_AVX512BF16 for bf16 [out, in] GEMMs
    bf16dp_rows: int = 0                             # ... ISA_AVX512BF16 up to this many rows, AVX2 above
    bf16_packed_rows: int = 0                        # ... then ISA_AVX512BF16_PACKED up to this many (even k)
    moe_rows: int = 0                                # the native MoE's repacked GEMMs: up to this many rows
    attention: frozenset = frozenset()               # dtypes of the native decode attention
    attention_dp: bool = False                       # ... bf16 over a bf16 cache on vdpbf16ps / zmm
    openblas: bool = False                           # numpy's OpenBLAS for fp32 (one thread only)
    onednn: bool = False                             # oneDNN inner products / prepacked LM head (fp32)
    omp_runtimes: tuple = ()

    def native_max_rows(self, dtype: torch.dtype, transposed: bool) -> int:
        return self.native_rows.get((dtype, transposed), 0)

    def describe(self) -> str:
        def rows(dt):
            r = [self.native_max_rows(dt, t) for t in (False, True)]
            return f"native <= {r[0]} rows [out,in], <= {r[1]} [in,out]" if any(r) else "torch"
        isa = {ISA_AVX2: "AVX2 shift-widened",
               ISA_AVX512BF16: f"AVX512-BF16 vdpbf16ps <= {self.bf16dp_rows} rows, repacked <= "
                               f"{self.bf16_packed_rows}, AVX2 above"}.get(self.bf16_isa, "-")
        fp32_rest = "OpenBLAS (1 thread)" if self.openblas else ("oneDNN/MKL" if self.onednn else "MKL")
        attn = "native " + "/".join(sorted(str(d).removeprefix("torch.") for d in self.attention)) + \
            (" (bf16: AVX512-BF16 scores)" if self.attention_dp else "") if self.attention else "gather + SDPA"
        omp = ", ".join(os.path.basename(p) for p in self.omp_runtimes) or "none"
        return (f"kernels {self.mode}, {self.threads} thread(s): fp32 GEMM {rows(torch.float32)}, else {fp32_rest}; "
                f"bf16 GEMM {rows(torch.bfloat16)} ({isa}), else torch/oneDNN; many rows: torch; "
                f"decode attention: {attn}; OpenMP runtime: {omp}")


def kernel_mode(mode: str | None = None) -> str:
    """`mode`, else $AFDSERVE_KERNELS, else 'auto'; a clear error for anything else."""
    mode = (mode or os.environ.get(KERNELS_ENV) or "auto").strip().lower()
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r} (--kernels / {KERNELS_ENV}); choose from "
                         f"{', '.join(KERNEL_MODES)}")
    return mode


def decide_policy(mode: str | None = None, threads: int | None = None) -> KernelPolicy:
    """The policy for this process: `mode` (see `kernel_mode`) at `threads` (default: torch's)."""
    mode = kernel_mode(mode)
    threads = max(1, threads or torch.get_num_threads())
    if mode == "native" and not NATIVE:
        raise ValueError("--kernels native: afdserve._native is not built or this CPU lacks AVX2/FMA "
                         "(reinstall with a C compiler, or use --kernels auto)")
    omp = tuple(openmp_runtimes())
    if mode == "torch" or not NATIVE:
        return KernelPolicy(mode, threads, openblas=mode == "auto" and OPENBLAS and threads == 1,
                            onednn=ONEDNN, omp_runtimes=omp)
    # the native kernels use `threads` only with OpenMP in one runtime, torch's; else one thread
    shared = FEATURES.get("openmp") and len(omp) <= 1
    if threads > 1 and not shared:
        log.warning("afdserve._native: %s; its kernels run single-threaded", "built without OpenMP"
                    if not FEATURES.get("openmp") else f"{len(omp)} OpenMP runtimes loaded ({', '.join(omp)})")
    if mode == "native":
        rows = {(dt, t): FORCED_NATIVE_ROWS for dt in (torch.float32, torch.bfloat16) for t in (False, True)}
    elif threads > 1 and not shared:
        rows = {}
    else:
        rows = dict(AUTO_NATIVE_ROWS[min(threads, 2)])
    isa = ISA_AVX512BF16 if FEATURES.get("avx512bf16") else ISA_AVX2
    packed = 0 if isa != ISA_AVX512BF16 or not rows else \
        FORCED_NATIVE_ROWS if mode == "native" else AUTO_BF16_PACKED_ROWS
    return KernelPolicy(mode, threads if shared else 1, rows, isa, AUTO_BF16DP_ROWS, packed,
                        AUTO_MOE_ROWS if packed and mode == "auto" else packed,
                        frozenset({torch.float32, torch.bfloat16}) if rows else frozenset(),
                        attention_dp=bool(rows) and isa == ISA_AVX512BF16,
                        openblas=mode == "auto" and OPENBLAS and threads == 1, onednn=ONEDNN, omp_runtimes=omp)


_policy: KernelPolicy = decide_policy()


def current_policy() -> KernelPolicy:
    return _policy


def use_policy(policy: KernelPolicy) -> KernelPolicy:
    """Install `policy` for every later `linear` / attention call; logs it when it changes."""
    global _policy
    if policy != _policy:
        log.info("%s", policy.describe())
    _policy = policy
    return policy


def ensure_policy() -> KernelPolicy:
    """At model load: re-decide the current policy's mode for torch's thread count if that changed
    since (a worker sets its threads before loading), else keep it."""
    if _policy.threads != max(1, torch.get_num_threads()):
        return use_policy(decide_policy(_policy.mode))
    return _policy


def one_thread_mode() -> bool:
    """True where the current policy uses OpenBLAS for fp32 rows (one thread): the fp32 layouts
    follow (`stored_transposed`)."""
    return _policy.openblas


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


def _native_linear(x: torch.Tensor, w: torch.Tensor, threads: int = 1, isa: int | None = None) -> torch.Tensor:
    """x [M, in] @ w^T with the native kernel; w [out, in] in a layout `_native_layout` accepts,
    fp32 or bf16 (x's dtype) on the CPU. bf16: `isa` (default: AVX512-BF16 where the CPU has it
    and the layout allows, else AVX2)."""
    layout = _native_layout(w)
    if layout is None:
        raise ValueError(f"the native kernels cannot read a weight with strides {w.stride()}")
    if x.dtype is torch.bfloat16 and isa is None:
        isa = ISA_AVX512BF16 if FEATURES.get("avx512bf16") and not layout[1] else ISA_AVX2
    return _native_call(x, w, *layout, threads, isa or ISA_AVX2)


def _native_call(x: torch.Tensor, w: torch.Tensor, ldw: int, transposed: bool, threads: int,
                 isa: int = ISA_AVX2) -> torch.Tensor:
    rows, k = x.shape
    if w.shape[1] != k or not (rows and k and w.shape[0]) or w.dtype is not x.dtype:
        return F.linear(x, w)                          # torch's shape / dtype error, or an empty product
    xs0, xs1 = x.stride()
    if xs1 != 1 or (rows > 1 and xs0 < k):
        x, xs0 = x.contiguous(), k
    n = w.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype)
    args = (x.data_ptr(), xs0 if rows > 1 else k, w.data_ptr(), ldw, y.data_ptr(), n, rows, n, k, transposed, threads)
    if x.dtype is torch.float32:
        _sgemm(*args)
    else:
        _bgemm(*args, ISA_AVX2 if transposed else isa)
    return y


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")


def is_transposed(w: torch.Tensor) -> bool:
    """True for a 2-D [out, in] weight whose memory is [in, out] row-major."""
    return w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1


def _native_or_none(p: KernelPolicy, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The native product where the policy sends x's rows and w's layout there, else None."""
    if w.dim() != 2 or not w.is_cpu or w.dtype is not x.dtype:
        return None
    layout = _native_layout(w)
    if layout is None:
        return None
    rows = x.shape[0]
    if p.bf16dp_rows < rows <= p.bf16_packed_rows and x.dtype is torch.bfloat16 and not layout[1] \
            and x.shape[1] % 2 == 0:
        return _native_call(x, w, *layout, p.threads, ISA_AVX512BF16_PACKED)
    if rows > p.native_rows.get((x.dtype, layout[1]), 0):
        return None
    return _native_call(x, w, *layout, p.threads, p.bf16_isa if rows <= p.bf16dp_rows else ISA_AVX2)


def _linear_fp32(p: KernelPolicy, x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    y = _native_or_none(p, x, w)
    if y is not None:
        return y
    rows = x.shape[0]
    if p.openblas and (rows == 1 or rows >= OPENBLAS_MIN_ROWS) and w.dim() == 2 and \
            (is_transposed(w) or w.is_contiguous()) and w.dtype is torch.float32:
        return _openblas_linear(x, w)
    if p.onednn and packed is not None and rows >= PACKED_ROWS:
        return _onednn_linear(x, packed)
    if p.onednn and rows > MKL_MAX_ROWS and is_transposed(w) and w.dtype is torch.float32:
        return _onednn_linear(x, w)
    return F.linear(x, w)


def _linear_bf16(p: KernelPolicy, x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    y = _native_or_none(p, x, w)
    return F.linear(x, w) if y is None else y


# CPU activations' dtype -> the kernel choice for it (other dtypes and devices: F.linear)
_CPU_LINEAR = {torch.float32: _linear_fp32, torch.bfloat16: _linear_bf16}


def linear(x: torch.Tensor, w, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ w[out, in]^T with the kernel the current policy picks for x's dtype, M and w's
    layout. `packed` is an optional oneDNN-prepacked copy of w (see `prepack`). A weight that is
    not a tensor (a quantized weight, afdserve/model/fp8.py) computes its own product."""
    if not isinstance(w, torch.Tensor):
        return w.linear(x)
    kernel = _CPU_LINEAR.get(x.dtype)
    if kernel is None or not x.is_cpu or x.dim() != 2 or \
            (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):   # no autograd below
        return F.linear(x, w)
    return kernel(_policy, x, w, packed)


def native_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: list[int] | torch.Tensor, block_size: int,
                            scale: float, kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor | None:
    """Decode attention (one new token per sequence) straight from the paged cache with the native
    kernel, or None where the policy does not send it there (not built, `--kernels torch`, a dtype
    other than fp32 / bf16 or mixed, not on the CPU, autograd needed). q [S, n_q, d]; k_cache,
    v_cache [slots, g, d]; block_tables [S, max_blocks]; context_lens [S] (new token included; a list
    or a CPU int64 tensor, AttentionMetadata.context_lens_tensor).
    No K/V is copied: each block's keys and values are read where they lie. The cache is in q's
    dtype, or float8_e4m3fn (an 8-bit cache: keys and values are code x `kv_scales` = (k, v);
    widened in registers, needs F16C, else None)."""
    if not _native_attention_takes(_policy, q, k_cache, v_cache):
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
    lens = torch.as_tensor(context_lens, dtype=torch.int64, device="cpu").contiguous()
    out = torch.empty_like(q)
    _attention_call(q, k_cache, v_cache, block_size, scale, kv_scales, out, tables, tables.shape[1], lens)
    return out


def _native_attention_takes(p: KernelPolicy, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether policy `p` runs decode attention of these tensors on the native kernel."""
    if q.dtype not in p.attention or q.dim() != 3 or k_cache.dim() != 3:
        return False
    if k_cache.dtype is torch.float8_e4m3fn and not FEATURES.get("f16c"):
        return False
    tensors = (q, k_cache, v_cache)
    return not (any(not t.is_cpu for t in tensors) or k_cache.dtype is not v_cache.dtype or
                k_cache.dtype not in (q.dtype, torch.float8_e4m3fn) or
                (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or
                not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape != v_cache.shape)


def _attention_call(q, k_cache, v_cache, block_size, scale, kv_scales, out, tables, table_stride, lens) -> None:
    """The native kernel over contiguous q / out, int64 tables (row stride `table_stride`, unit column
    stride) and lens, under the current policy's threads and instruction set."""
    p = _policy
    S, nq, d = q.shape
    slots, g, _ = k_cache.shape
    _attention_kernel(q.data_ptr(), S, nq, d, k_cache.data_ptr(), v_cache.data_ptr(), slots // block_size,
                      g, block_size, tables.data_ptr(), table_stride, lens.data_ptr(), float(scale), out.data_ptr(),
                      p.threads, q.dtype is torch.bfloat16, k_cache.dtype is torch.float8_e4m3fn,
                      float(kv_scales[0]), float(kv_scales[1]), p.attention_dp)


def decode_attention_runner(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
                            scale: float, kv_scales: tuple[float, float], out: torch.Tensor):
    """For decode graphs: a callable(block_tables, context_lens_tensor) -> bool that runs
    native_decode_attention of these very tensors into `out` for a later step's block tables and
    context lengths, everything else checked once here (the kernel checks the tables and lengths
    against the cache before reading). It returns False where the current policy no longer sends
    this attention to the native kernel. None where it would not now."""
    S = q.shape[0] if q.dim() == 3 else 0
    if not _native_attention_takes(_policy, q, k_cache, v_cache) or not S or not q.is_contiguous() or \
            not out.is_contiguous() or out.shape != q.shape or out.dtype is not q.dtype or \
            k_cache.shape[2] != q.shape[2] or k_cache.shape[0] % block_size:
        return None

    def run(tables: torch.Tensor, lens: torch.Tensor) -> bool:
        if q.dtype not in _policy.attention or tables.dtype is not torch.int64 or tables.shape[0] != S or \
                (tables.dim() == 2 and tables.shape[1] and tables.stride(1) != 1) or lens.shape != (S,) or \
                lens.dtype is not torch.int64 or not lens.is_contiguous():
            return False
        _attention_call(q, k_cache, v_cache, block_size, scale, kv_scales, out, tables, tables.stride(0), lens)
        return True
    return run


def _elementwise_ok(p: KernelPolicy, *tensors: torch.Tensor) -> bool:
    """The native element-wise kernels take these CPU tensors of one dtype the policy sends there
    (`attention`: the dtypes of the native decode kernels) and no autograd is wanted."""
    dt = tensors[0].dtype
    return dt in p.attention and all(t.is_cpu and t.dtype is dt for t in tensors) and \
        not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def native_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """bf16 RMSNorm of x [T, H] (unit stride along H) in one native pass (elementwise.c), or None
    where the policy / layout does not send it there."""
    p = _policy
    if x.dtype is not torch.bfloat16 or x.dim() != 2 or x.stride(1) != 1 or not w.is_contiguous() or \
            w.shape != x.shape[1:] or not _elementwise_ok(p, x, w):
        return None
    y = torch.empty(x.shape, dtype=x.dtype)
    if x.shape[0]:
        _native.rms_norm(x.data_ptr(), x.stride(0), w.data_ptr(), y.data_ptr(), x.shape[1], x.shape[0],
                         x.shape[1], float(eps), p.threads)
    return y


def native_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotate-half RoPE of x [T, heads, d] (heads contiguous) at int64 `positions` from the fp32
    tables cos / sin [P, d] in one native pass, bitwise equal to the torch formula; or None."""
    p = _policy
    if x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2] or positions.dtype is not torch.int64 or \
            not positions.is_contiguous() or not (cos.is_contiguous() and sin.is_contiguous()) or \
            cos.dtype is not torch.float32 or cos.shape != sin.shape or cos.shape[1] != x.shape[2] or \
            positions.shape != x.shape[:1] or not _elementwise_ok(p, x) or not positions.is_cpu:
        return None
    y = torch.empty(x.shape, dtype=x.dtype)
    if x.shape[0]:
        _native.rope(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], x.shape[2], positions.data_ptr(),
                     cos.data_ptr(), sin.data_ptr(), cos.shape[0], y.data_ptr(), x.dtype is torch.bfloat16, p.threads)
    return y


def native_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`layers.route` (softmax over the experts in fp32, top-k, optional renormalization) in one
    native call for bf16 / fp32 CPU logits [T, E] (unit stride along E), or None where the policy
    does not send it there. Equal to the torch path up to the last bits of the softmax (libm's
    expf); ties go to the lower expert id."""
    x = router_logits
    if x.dim() != 2 or x.stride(1) != 1 or not 0 < top_k <= x.shape[1] <= 4096 or not _elementwise_ok(_policy, x):
        return None
    T = x.shape[0]
    weights, ids = torch.empty(T, top_k, dtype=torch.float32), torch.empty(T, top_k, dtype=torch.int64)
    if T:
        _native.route(x.data_ptr(), x.stride(0), T, x.shape[1], x.dtype is torch.bfloat16, top_k, renormalize,
                      weights.data_ptr(), ids.data_ptr())
    return weights, ids


def native_argmax(x: torch.Tensor) -> torch.Tensor | None:
    """x.argmax(-1) (int64) for fp32 CPU rows [M, N] with unit stride along N, in one native pass
    over the threads (torch's first-maximum and NaN rules), or None where the policy does not send
    it there. Greedy sampling takes the argmax of a whole batch's logits every step, where torch's
    reduction runs on one thread."""
    if x.dim() != 2 or x.dtype is not torch.float32 or x.stride(1) != 1 or not x.shape[1] or \
            not _elementwise_ok(_policy, x):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[0]:
        _native.argmax(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr(), _policy.threads)
    return out


def residual_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, through one native pass for contiguous CPU tensors of one dtype the policy sends to
    the native element-wise kernels (bitwise torch's add: an fp32 sum rounded once), else torch.
    A decode step's residual adds are a few thousand elements: torch's dispatcher costs more.
    Anything else that adds (run_layers is generic over what it carries) adds as itself."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or \
            not (a.is_contiguous() and b.is_contiguous()) or not _elementwise_ok(_policy, a, b):
        return a + b
    y = torch.empty(a.shape, dtype=a.dtype)
    if y.numel():                                  # (an empty micro-batch: nothing to add, no buffers)
        _native.add(a.data_ptr(), b.data_ptr(), y.data_ptr(), a.numel(), a.dtype is torch.bfloat16)
    return y


def native_write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> bool:
    """k_cache[slots] = k and v_cache[slots] = v (caches [N, g, d], new K/V [T, g, d] with each token's
    g x d contiguous) in one native call: True, or False where the policy, dtypes or layouts do not
    send it there (the caller then runs index_copy_). A slot outside the cache raises IndexError."""
    p = _policy
    if k_cache.dim() != 3 or k.dim() != 3 or k_cache.shape != v_cache.shape or k.shape != v.shape or \
            k.shape[1:] != k_cache.shape[1:] or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or \
            any(t.stride(2) != 1 or t.stride(1) != t.shape[2] for t in (k, v)) or \
            slots.dtype is not torch.int64 or slots.shape != k.shape[:1] or not slots.is_contiguous() or \
            not slots.is_cpu or not _elementwise_ok(p, k_cache, v_cache, k, v):
        return False
    es = k.element_size()
    _native.write_kv(k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], slots.data_ptr(), k.shape[0],
                     k.data_ptr(), k.stride(0) * es, v.data_ptr(), v.stride(0) * es, k.shape[1] * k.shape[2] * es)
    return True


def native_silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for a fused bf16 [M, 2W] projection output in one native pass, or None
    (fp32 keeps torch's: libm's exp differs from torch's in the last bit of some fp32 outputs)."""
    p = _policy
    if gate_up.dtype is not torch.bfloat16 or gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2 or not gate_up.shape[1] or \
            not _elementwise_ok(p, gate_up):
        return None
    M, W = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((M, W), dtype=gate_up.dtype)
    if M:
        _native.silu_mul(gate_up.data_ptr(), gate_up.stride(0), M, W, y.data_ptr(),
                         gate_up.dtype is torch.bfloat16, p.threads)
    return y


def native_scores(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """q @ k^T in fp32, not rounded, for bf16 q [M, d] and k [N, d] (unit stride along d, d even):
    attention scores through the repacked AVX512-BF16 kernel (products exact, fp32 sums), into
    `out` (a contiguous fp32 [M, N]) when given. None where the policy has no such kernel (it needs
    AVX512-BF16 and the native kernels)."""
    p = _policy
    if q.dtype is not torch.bfloat16 or k.dtype is not torch.bfloat16 or not p.bf16_packed_rows or \
            q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1] or q.shape[1] % 2 or \
            q.stride(1) != 1 or k.stride(1) != 1 or not _elementwise_ok(p, q, k):
        return None
    (M, d), N = q.shape, k.shape[0]
    y = torch.empty((M, N), dtype=torch.float32) if out is None else out
    if y.shape != (M, N) or y.dtype is not torch.float32 or not y.is_contiguous():
        raise ValueError(f"native_scores: out must be a contiguous fp32 [{M}, {N}] tensor")
    if M and N:
        _bgemm(q.data_ptr(), q.stride(0) if M > 1 else d, k.data_ptr(), k.stride(0) if N > 1 else d,
               y.data_ptr(), N, M, N, d, False, p.threads, ISA_AVX512BF16_PACKED, True)
    return y


def native_causal_softmax(scores: torch.Tensor, scale: float, heads: int, first: int,
                          out: torch.Tensor) -> torch.Tensor:
    """bf16 probabilities of fp32 attention scores [rows, n] (overwritten: scratch) into `out`
    (bf16 [rows, n]): row r is query position first + r // heads and sees keys 0..that position;
    one native pass (elementwise.c: scale, mask, max, exp, sum, normalise, round)."""
    rows, n = scores.shape
    if not (scores.is_contiguous() and out.is_contiguous()) or out.shape != scores.shape or \
            scores.dtype is not torch.float32 or out.dtype is not torch.bfloat16:
        raise ValueError("native_causal_softmax: contiguous fp32 scores and bf16 out of one shape")
    if rows:
        _native.softmax_bf16(scores.data_ptr(), n, rows, n, float(scale), heads, first, out.data_ptr(), n,
                             _policy.threads)
    return out


def _moe_matrix(w) -> tuple | None:
    """A MoE weight [(E,) N, K] as moe.c takes it, (address, leading dim, expert stride, scales, their
    leading dim, expert stride, row block, row offset): a CPU bf16 tensor with unit stride along K, or
    an Fp8Weight on its block grid (afdserve/model/fp8.py); None for anything else."""
    def ld(t):
        return t.stride(-2) if t.shape[-2] > 1 else t.shape[-1]

    def expert_stride(t):
        return t.stride(0) if t.dim() == 3 else 0
    if isinstance(w, torch.Tensor):
        ok = w.dtype is torch.bfloat16 and w.dim() in (2, 3) and w.stride(-1) == 1 and ld(w) >= w.shape[-1]
        return (w.data_ptr(), ld(w), expert_stride(w), 0, 0, 0, 1, 0) if ok else None
    if not (fp8.NATIVE_BF16 and isinstance(w, fp8.Fp8Weight)) or w.col_offset or not w.is_cpu:
        return None
    c, s = w.codes, w.scale
    if s.stride(-1) != 1 or ld(c) < c.shape[-1]:
        return None
    return (c.data_ptr(), ld(c), expert_stride(c), s.data_ptr(), ld(s), expert_stride(s), w.row_block, w.row_offset)


# The address of afdserve._fp8's bf16-activation GEMM, which moe.c calls for FP8 experts (0: none).
_FP8_GEMM = fp8._NATIVE.gemm_bf16_address() if fp8.NATIVE_BF16 else 0


def native_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up, down, first: int,
               shared: tuple | None = None) -> torch.Tensor | None:
    """The routed experts of a MoE layer on bf16 activations in one native call (moe.c): x [T, H];
    weights fp32 / ids int64 [T, k]; gate_up [E, 2W, H] and down [E, H, W] the local experts (global
    ids first..first+E-1), bf16 tensors or FP8 weights (Fp8Weight); `shared`: the shared expert's
    (gate_up [2Ws, H], down [H, Ws]), added as `y + shared(x)`. Bitwise MoE.forward's result (+ the
    shared expert's) under the same policy while every bf16 GEMM has at most `bf16_packed_rows` rows
    and every FP8 one at most fp8.NATIVE_MAX_ROWS (the rows where the FP8 product is native); above,
    bf16 products run the repacked kernel up to `moe_rows` where the Python path would take torch's
    GEMM (equal up to rounding). None where the policy, dtypes or layouts do not send it there, or a
    GEMM gets more rows than that."""
    p = _policy
    mats = (gate_up, down) + (tuple(shared) if shared else ())
    layouts = [_moe_matrix(m) for m in mats]
    if x.dtype is not torch.bfloat16 or x.dim() != 2 or not p.native_rows.get((torch.bfloat16, False)) \
            or None in layouts or weights.dtype is not torch.float32 or ids.dtype is not torch.int64 \
            or not _elementwise_ok(p, x) or not all(m.is_cpu for m in mats) \
            or (torch.is_grad_enabled() and any(getattr(m, "requires_grad", False) for m in mats)):
        return None
    (T, H), (E, W2, _) = x.shape, gate_up.shape
    Ws2 = shared[0].shape[0] if shared else 0
    if gate_up.shape[2:] != (H,) or down.shape != (E, H, W2 // 2) or ids.shape != weights.shape or \
            ids.shape[0] != T or (shared and (shared[0].shape != (Ws2, H) or shared[1].shape != (H, Ws2 // 2))):
        return None
    has_fp8 = any(m[1] for m in layouts)                      # a matrix with scales: e4m3 codes
    if has_fp8 and not _FP8_GEMM:
        return None
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    y = torch.empty((T, H), dtype=x.dtype)
    if not T:
        return y
    small = p.bf16_isa if p.bf16_isa else ISA_AVX2
    none = (0, 0, 0, 0, 0, 0, 1, 0)
    done = _native.moe_bf16(x.data_ptr(), T, H, ids.data_ptr(), weights.data_ptr(), ids.shape[1], first, E,
                            layouts[0], layouts[1], W2 // 2, layouts[2] if shared else none,
                            layouts[3] if shared else none, Ws2 // 2, y.data_ptr(), p.bf16dp_rows,
                            p.moe_rows, p.native_rows[(torch.bfloat16, False)], small,
                            _FP8_GEMM if has_fp8 else 0, fp8.NATIVE_MAX_ROWS, p.threads)
    return y if done else None


def prepack(w: torch.Tensor, rows_hint: int = 8) -> torch.Tensor | None:
    """A oneDNN-prepacked copy of a CPU fp32 weight [out, in], or None where oneDNN is absent."""
    if not ONEDNN or not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dtype != torch.float32:
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


def _cpu_fp32(p) -> bool:
    return isinstance(p, torch.Tensor) and p.device.type == "cpu" and p.dtype == torch.float32


def stored_transposed(out: int, inp: int) -> bool:
    """Whether `prepare_for_decode` stores a CPU fp32 [out, inp] matrix transposed under the
    current policy: the wide ones (out > inp), which every kernel streams faster
    transposed at few rows; with one thread and OpenBLAS but no native kernels, also every matrix
    but the strongly narrow ones (inp >= 2 out, e.g. o_proj and dense down projections), because
    OpenBLAS's small-M sgemm is faster over transposed storage while its one-row GEMV is faster
    over the checkpoint layout for those (benchmarks/kernel_bench.py)."""
    p = _policy
    return out > inp or (p.openblas and not p.native_rows and inp < 2 * out)


@torch.no_grad()
def prepare_for_decode(model: nn.Module) -> nn.Module:
    """Fuse projections and pick CPU layouts in place (see the module docstring); returns model."""
    from afdserve.model.attention import MFAttention
    from afdserve.model.layers import MoE, SwiGLU

    ensure_policy()
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

"""Which linear kernel reads decode-shaped weights fastest on this machine.

For every weight shape the `small` preset decodes with and every row count M, times (one thread by
default, candidates interleaved round by round so that machine noise hits them alike) over enough
distinct weights to stream from memory, not cache:
  mkl          F.linear over the checkpoint layout [out, in]
  mkl-T        F.linear over transposed storage ([in, out] contiguous)
  onednn-T     oneDNN inner product over transposed storage
  onednn-pack  oneDNN inner product over a prepacked copy
  openblas     numpy's OpenBLAS sgemm over the checkpoint layout
  openblas-T   numpy's OpenBLAS sgemm over transposed storage (x @ W^T with W^T contiguous)
  native       afdserve's own decode GEMM (afdserve/native/decode_kernels.c) over the checkpoint layout
  native-T     the same over transposed storage (when the extension is built)
and prints weight GB/s per candidate, the machine's streaming-read bandwidth measured in the same
run, and which candidate `afdserve.model.kernels.linear` dispatches to. This is how the layouts and
thresholds of afdserve/model/kernels.py were chosen (benchmarks/README.md, "Kernel choices").

    python benchmarks/kernel_bench.py [--threads 1] [--dtype float32|bfloat16] [--rows 1,2,4,8,32,64]
                                      [--shapes 4096x768,768x2048] [--json out.json]

bf16 candidates: torch-bf16 / torch-bf16-T (F.linear in bf16, i.e. oneDNN, over either layout),
native-avx2 (shift-widened bf16, fp32 FMA) over either layout, native-bf16dp (AVX512-BF16
vdpbf16ps, checkpoint layout; where the CPU has it), native-packed (vdpbf16ps over weights repacked
per 32 outputs, the kernel for 5-256 rows). Native kernels run on --threads threads.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from afdserve.model import kernels
from afdserve.model.kernels import cpu_flags

CPU_FLAGS_OF_INTEREST = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"}

SHAPES = {  # (out, in): what it is in the small preset
    (32000, 768): "LM head",
    (4096, 768): "dense gate+up (fused)",
    (2048, 384): "wq",
    (1024, 768): "expert / shared gate+up (fused)",
    (640, 768): "q_proj+k_proj+v_proj (fused)",
    (768, 2048): "o_proj, dense down",
    (768, 512): "expert / shared down",
}


def candidates(ws: list[torch.Tensor], rows: int, threads: int) -> dict:
    """Every kernel that can multiply `rows` rows by the weights `ws` (fp32 or bf16)."""
    wt = [w.t().contiguous().t() for w in ws]
    out = {"mkl": lambda x: [F.linear(x, w) for w in ws],
           "mkl-T": lambda x: [F.linear(x, w) for w in wt]}
    if ws[0].dtype is torch.bfloat16:          # F.linear in bf16 is oneDNN's (AMX / AVX512-BF16 where present)
        out = {"torch-bf16": out["mkl"], "torch-bf16-T": out["mkl-T"]}
        if kernels.NATIVE:
            out["native-avx2"] = lambda x: [kernels._native_linear(x, w, threads, kernels.ISA_AVX2) for w in ws]
            out["native-avx2-T"] = lambda x: [kernels._native_linear(x, w, threads) for w in wt]
            if kernels.FEATURES.get("avx512bf16"):
                out["native-bf16dp"] = lambda x: [kernels._native_linear(x, w, threads, kernels.ISA_AVX512BF16)
                                                  for w in ws]
                if ws[0].shape[1] % 2 == 0:
                    out["native-packed"] = lambda x: [
                        kernels._native_linear(x, w, threads, kernels.ISA_AVX512BF16_PACKED) for w in ws]
        out["dispatch"] = lambda x: [kernels.linear(x, w) for w in ws]
        return out
    if kernels.ONEDNN:
        packed = [kernels.prepack(w) for w in ws]
        out["onednn-T"] = lambda x: [kernels._onednn_linear(x, w) for w in wt]
        out["onednn-pack"] = lambda x: [kernels._onednn_linear(x, p) for p in packed]
    if threads == 1:                              # numpy's OpenBLAS is held to one thread
        nt = [w.t().numpy() for w in wt]          # [in, out] contiguous, zero-copy
        nw = [w.numpy() for w in ws]
        out["openblas"] = lambda x: [x.numpy() @ w.T for w in nw]
        out["openblas-T"] = lambda x: [x.numpy() @ w for w in nt]
    if kernels.NATIVE:
        out["native"] = lambda x: [kernels._native_linear(x, w, threads) for w in ws]
        out["native-T"] = lambda x: [kernels._native_linear(x, w, threads) for w in wt]
    o, i = ws[0].shape                            # what the engine stores and dispatches
    out["dispatch"] = lambda x: [kernels.linear(x, w) for w in (wt if kernels.stored_transposed(o, i) else ws)]
    return out


def bandwidth(rounds: int = 5) -> float:
    x = torch.ones(64 * 2 ** 20)  # 256 MiB
    best = min(_timed(lambda: x.sum()) for _ in range(rounds))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,3,4,8,12,16,32,64")
    ap.add_argument("--bytes", type=float, default=160e6, help="weight bytes streamed per timing")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="time per candidate over the rounds (min where the machine is shared)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shapes", help="comma list of OUTxIN (default: the small preset's)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads, user_api="blas")
    kernels.use_policy(kernels.decide_policy(threads=args.threads))
    dtype = getattr(torch, args.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    shapes = SHAPES if not args.shapes else \
        {tuple(int(v) for v in s.split("x")): "" for s in args.shapes.split(",")}
    rows = [int(r) for r in args.rows.split(",")]
    bw = bandwidth()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.dtype}, CPU flags {sorted(cpu_flags() & CPU_FLAGS_OF_INTEREST)}, oneDNN {'yes' if kernels.ONEDNN else 'no'}, "
          f"native kernels {'yes' if kernels.NATIVE else 'no'}; "
          f"streaming read {bw / 1e9:.1f} GB/s")
    results = []
    g = torch.Generator().manual_seed(0)
    print(kernels.current_policy().describe())
    for (o, i), what in shapes.items():
        n = max(1, int(args.bytes / (o * i * size)))
        ws = [torch.randn(o, i, generator=g).to(dtype) for _ in range(n)]
        for m in rows:
            x = torch.randn(m, i, generator=g).to(dtype)
            cands = candidates(ws, m, args.threads)
            times: dict[str, list[float]] = {k: [] for k in cands}
            for k, fn in cands.items():          # warm-up (also oneDNN's primitive cache)
                fn(x)
            for _ in range(args.rounds):
                for k, fn in cands.items():
                    times[k].append(_timed(lambda: fn(x)))
            stat = min if args.stat == "min" else statistics.median
            gbs = {k: n * o * i * size / stat(v) / 1e9 for k, v in times.items()}
            best = max((k for k in gbs if k != "dispatch"), key=gbs.get)
            results.append({"shape": [o, i], "what": what, "rows": m, "gb_per_s": gbs, "best": best})
            print(f"{what:34s} {o:5d}x{i:<4d} M={m:<3d} " +
                  "  ".join(f"{k} {v:5.1f}" for k, v in gbs.items()) + f"   best: {best}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_gb_per_s": bw / 1e9, "threads": args.threads, "dtype": args.dtype,
                       "cpu_flags": sorted(cpu_flags() & CPU_FLAGS_OF_INTEREST), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

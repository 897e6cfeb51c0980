"""How fast afdserve's FP8 decode GEMMs stream their weights, against the bf16 native kernel.

For each weight shape of the `small` preset (plus one large matrix) and each row count M, times
over enough distinct weights to stream from memory, not cache (candidates interleaved round by
round, so machine noise hits them alike):
  bf16        afdserve's bf16 few-row GEMM (`kernels._native_linear`, AVX512-BF16 where present,
              else AVX2) over a bf16 weight: 2 bytes per weight
  fp8-bf16x   the FP8 kernel with bf16 activations (what a bf16 run with FP8 weights calls)
  fp8-fp32x   the FP8 kernel with fp32 activations (the AVX2 path; fp32 runs, AVX2-only CPUs)
and prints GB/s of the bytes each one reads at its stored precision (FP8: 1 byte per weight + the
fp32 block scales), the machine's streaming-read bandwidth measured in the same run (the fastest
read kernel of `afdserve.bench.machine.measure_bandwidth`, the limit `afdserve bench` divides by), the speed-up
of FP8 over bf16 per product (time ratio, from one run), and the CPU model and flags.

    python benchmarks/fp8_kernel_bench.py [--threads 2] [--rows 1,2,4,8,16] [--shapes 4096x768,...]
                                          [--stat median|min]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import CPU_FLAGS_OF_INTEREST  # noqa: E402

from afdserve.bench.machine import measure_bandwidth  # noqa: E402
from afdserve.model import fp8, kernels  # noqa: E402
from afdserve.model.kernels import cpu_flags  # noqa: E402

SHAPES = {  # (out, in): what it is in the small preset
    (2048, 384): "wq",
    (640, 768): "q/k/v fused",
    (768, 2048): "o_proj, dense down",
    (1024, 768): "expert gate+up",
    (768, 512): "expert down",
    (4096, 768): "dense gate+up",
    (8192, 8192): "large (out of cache)",
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def candidates(wb: list[torch.Tensor], w8: list[fp8.Fp8Weight], threads: int) -> dict:
    """name -> (function of x in bf16, bytes read per call)."""
    nb = sum(w.numel() * 2 for w in wb)
    n8 = sum(w.nbytes for w in w8)
    out = {}
    if kernels.NATIVE:
        out["bf16"] = (lambda x: [kernels._native_linear(x, w, threads) for w in wb], nb)
    if fp8._NATIVE is not None:
        if fp8.NATIVE_BF16:
            out["fp8-bf16x"] = (lambda x: [fp8.native_linear(x, w) for w in w8], n8)
        out["fp8-fp32x"] = (lambda x: [fp8.native_linear(x.float(), w) for w in w8], n8)
    return out


def _timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--bytes", type=float, default=128e6, help="FP8 weight bytes streamed per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="time per candidate over the rounds (min where the machine is shared)")
    ap.add_argument("--shapes", help="comma list of OUTxIN (default: the small preset's and 8192x8192)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.use_policy(kernels.decide_policy(threads=args.threads))
    shapes = SHAPES if not args.shapes else \
        {tuple(int(v) for v in s.split("x")): "" for s in args.shapes.split(",")}
    bwm = measure_bandwidth(size_bytes=256 << 20)          # the denominator of `afdserve bench`'s % BW
    bw = bwm["bytes_per_s"]
    print(f"CPU: {cpu_model()}; flags {sorted(cpu_flags() & (CPU_FLAGS_OF_INTEREST | {'avx512vbmi', 'f16c'}))}; "
          f"torch {torch.__version__}, {args.threads} thread(s); FP8 bf16-activation kernel "
          f"{'yes' if fp8.NATIVE_BF16 else 'no'}; streaming read {bw / 1e9:.1f} GB/s ({bwm['kernel']}, as in "
          f"afdserve bench)")
    print("GB/s of stored bytes (FP8: codes + fp32 scales; bf16: 2 bytes/weight); "
          "'x bf16' = bf16 time / FP8 time for the same product")
    g = torch.Generator().manual_seed(0)
    for (o, i), what in shapes.items():
        n = max(2, int(args.bytes / (o * i)))
        wb = [torch.randn(o, i, generator=g).to(torch.bfloat16) for _ in range(n)]
        w8 = [fp8.quantize(w) for w in wb]
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, i, generator=g).to(torch.bfloat16)
            cands = candidates(wb, w8, args.threads)
            times: dict[str, list[float]] = {k: [] for k in cands}
            for fn, _ in cands.values():
                fn(x)
            for _ in range(args.rounds):
                for k, (fn, _) in cands.items():
                    times[k].append(_timed(fn, x))
            stat = min if args.stat == "min" else statistics.median
            t = {k: stat(v) for k, v in times.items()}
            gbs = {k: cands[k][1] / t[k] / 1e9 for k in cands}
            ratio = "  ".join(f"{k} {t['bf16'] / t[k]:.2f}x bf16" for k in t if k != "bf16" and "bf16" in t)
            print(f"{what:22s} {o:5d}x{i:<5d} M={m:<3d} " + "  ".join(f"{k} {v:5.1f}" for k, v in gbs.items())
                  + f"   {ratio}   ({100 * max(gbs.values()) * 1e9 / bw:.0f}% of read BW at best)", flush=True)
        del wb, w8
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

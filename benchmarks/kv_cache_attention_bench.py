"""Decode attention over the paged KV cache: the native kernel reading an fp8 (e4m3) cache against
the same kernel over a bf16 and an fp32 cache, and against the gathered torch path.

    python benchmarks/kv_cache_attention_bench.py [--batches 8,32] [--contexts 1024,4096] [--threads N]

Shapes of a preset's attention (`--preset`, default small: its query heads, one KV head, its head
dim). Every candidate runs the same sequences (each sequence's blocks consecutive, or shuffled
with --shuffled, as in a long-running cache); the candidates are timed in turn, round after
round, and the minimum per candidate is printed with the KV bytes each reads per call and the
speed relative to the bf16 cache. On a CPU with AVX512-BF16 the bf16 cache is also timed on the
AVX2 code ("bf16 native, AVX2"), which the kernel policy otherwise leaves for other CPUs.
`--native-so PATH` times another build of afdserve._native (e.g. one compiled with
-DKV_E4M3_LUT, the 256-entry table variant of the e4m3 widening) in the same process as well.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import time

import torch

from afdserve.bench.machine import describe
from afdserve.config import get_preset
from afdserve.model import kernels
from afdserve.model.attention import AttentionMetadata, _gathered_decode_attention


def _load_native(path: str):
    loader = importlib.machinery.ExtensionFileLoader("afdserve._native", path)
    spec = importlib.util.spec_from_file_location("afdserve._native", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _case(batch: int, context: int, nq: int, d: int, bs: int = 16, shuffled: bool = False):
    per = -(-(context + 1) // bs)
    nblocks = batch * per + 1
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    k = torch.randn(nblocks * bs, 1, d, generator=gen) * 0.5
    v = torch.randn(nblocks * bs, 1, d, generator=gen) * 0.5
    q = torch.randn(batch, nq, d, generator=gen)
    perm = torch.randperm(nblocks, generator=gen).tolist() if shuffled else list(range(nblocks))
    tables = [perm[s * per:(s + 1) * per] for s in range(batch)]
    lens = [context] * batch
    meta = AttentionMetadata.build(list(range(batch)), [0] * batch, [1] * batch, lens, tables, bs)
    return q, k, v, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--threads", type=int, default=None, help="default: torch's thread count")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shuffled", action="store_true", help="blocks in random order (a fragmented cache; default: "
                    "each sequence's blocks consecutive, as a fresh engine allocates them)")
    ap.add_argument("--native-so", default=None, help="another _native build to time as 'fp8 (alt)'")
    args = ap.parse_args(argv)
    if not kernels.NATIVE:
        print("afdserve._native is not built or cannot run here")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels.use_policy(kernels.decide_policy("auto"))
    alt = _load_native(args.native_so).decode_attention if args.native_so else None
    c = get_preset(args.preset)
    nq, d = c.num_attention_heads, c.head_dim
    flags = sorted(kernels.cpu_flags() & {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"machine: {describe()['cpu']}, flags {flags}, torch {torch.__version__}")
    print(f"{args.preset}: {nq} query heads, 1 KV head, d {d}; {torch.get_num_threads()} thread(s); "
          f"min of {args.rounds} rounds")
    policy = kernels.current_policy()
    avx2 = dataclasses.replace(policy, attention_dp=False)
    print(f"{'batch x ctx':>12} {'candidate':>20} {'ms':>9} {'KV GB/s':>8} {'x bf16':>7}")
    for b in [int(x) for x in args.batches.split(",")]:
        for ctx in [int(x) for x in args.contexts.split(",")]:
            q, k, v, meta = _case(b, ctx, nq, d, shuffled=args.shuffled)
            caches = {t: (k.to(t), v.to(t)) for t in (torch.float32, torch.bfloat16, torch.float8_e4m3fn)}
            qb = q.bfloat16()

            def native(cache_dtype, qq=qb):
                kc, vc = caches[cache_dtype]
                return lambda: kernels.native_decode_attention(qq, kc, vc, meta.block_tables, meta.context_lens,
                                                               meta.block_size, 0.1)

            def gathered(cache_dtype):
                kc, vc = caches[cache_dtype]
                return lambda: _gathered_decode_attention(qb, kc, vc, meta, 0.1)

            def native_avx2():
                kernels.use_policy(avx2)
                try:
                    return native(torch.bfloat16)()
                finally:
                    kernels.use_policy(policy)

            cands = {"bf16 native": (native(torch.bfloat16), 2), "fp8 native": (native(torch.float8_e4m3fn), 1),
                     "fp8 native, fp32 q": (native(torch.float8_e4m3fn, q), 1),
                     "fp32 native": (native(torch.float32, q), 4),
                     "bf16 gathered": (gathered(torch.bfloat16), 2), "fp8 gathered": (gathered(torch.float8_e4m3fn), 1)}
            if policy.attention_dp:
                cands["bf16 native, AVX2"] = (native_avx2, 2)
            if alt is not None:
                def alt_fp8():
                    kc, vc = caches[torch.float8_e4m3fn]
                    old = kernels._attention_kernel
                    kernels._attention_kernel = alt
                    try:
                        return native(torch.float8_e4m3fn)()
                    finally:
                        kernels._attention_kernel = old
                cands["fp8 native (alt)"] = (alt_fp8, 1)
            best = {n: float("inf") for n in cands}
            with torch.inference_mode():
                for fn, _ in cands.values():
                    fn()
                for _ in range(args.rounds):
                    for n, (fn, _) in cands.items():
                        t = time.perf_counter()
                        fn()
                        best[n] = min(best[n], time.perf_counter() - t)
            kv_elems = 2 * b * ctx * d
            for n, (_, elem) in cands.items():
                print(f"{f'{b} x {ctx}':>12} {n:>20} {best[n] * 1e3:9.3f} {kv_elems * elem / best[n] / 1e9:8.2f} "
                      f"{best['bf16 native'] / best[n]:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefill attention over MFA's single KV head: afdserve's blockwise native path vs torch's SDPA.

For each prompt length, times `attention._sequence_attention` (a whole prompt: t = ctx) in bf16
under the `auto` kernel policy (native scores + causal softmax, torch's GEMM with V;
docs/kernels.md, "Prefill attention over one KV head") and under `torch` (torch's fused
scaled_dot_product_attention), best of --rounds, and prints the ratio with the CPU it ran on.

    python benchmarks/prefill_attention_bench.py [--lengths 128,1024,2048] [--heads 16] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from afdserve.model import attention, kernels


def best_ms(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="128,1024,2048")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    flags = sorted(kernels.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"machine: {platform.processor() or platform.machine()}, flags {flags}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), bf16, {args.heads} query heads sharing one KV head, d {args.head_dim}")
    for n in (int(v) for v in args.lengths.split(",")):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(n, args.heads, args.head_dim, generator=g).bfloat16()
        k = torch.randn(n, 1, args.head_dim, generator=g).bfloat16()
        v = torch.randn(n, 1, args.head_dim, generator=g).bfloat16()
        scale = args.head_dim ** -0.5
        times = {}
        for mode in ("auto", "torch"):
            kernels.use_policy(kernels.decide_policy(mode))
            times[mode] = best_ms(lambda: attention._sequence_attention(q, k, v, scale), args.rounds)
        native = kernels.use_policy(kernels.decide_policy("auto")) and \
            attention._mfa_causal_attention(q, k, v, scale) is not None
        print(f"prompt {n:5d}: afdserve {'native' if native else 'SDPA (no native path here)'} "
              f"{times['auto']:7.1f} ms, torch SDPA {times['torch']:7.1f} ms, {times['torch'] / times['auto']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batch-1 decode against the memory roofline, bf16 and FP8 weights interleaved in one process.

On a machine whose memory bandwidth moves from minute to minute (a shared VM), two runs of
`afdserve bench` minutes apart can differ by more than the effect being measured. This script
loads the checkpoint twice (bf16 weights, and FP8 weights quantized at load), as the engine does
(colocated runner, kernel policy, decode graphs), and takes turns, round after round: the
streaming-read bandwidth (the read kernels of `afdserve bench`, over 1 GiB), then --steps decode
steps of each model (random tokens, --context positions). Each mode keeps its fastest round.

Printed, with the CPU model and flags: ms per step and tokens/s of each, the bytes a step must
move at the stored precision (`afdserve.bench.decode.step_bytes`, scales included), the share of
the highest bandwidth any round measured (the strict roofline, as `afdserve bench` takes the best
of its measurements) and of the median one, and FP8 / bf16.

    python benchmarks/batch1_roofline_bench.py [--model DIR | --preset small] [--rounds 6] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_graphs_bench import BS, Decoder  # noqa: E402

from afdserve.bench.decode import make_checkpoint, step_bytes  # noqa: E402
from afdserve.bench.machine import describe, measure_bandwidth  # noqa: E402
from afdserve.config import Step3Config  # noqa: E402
from afdserve.engine.executor import CacheConfig, ColocatedExecutor  # noqa: E402
from afdserve.model import kernels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random --preset checkpoint)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="decode steps per round and mode")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="afdserve-roofline-")
        args.model = str(make_checkpoint(args.preset, Path(tmp.name) / args.preset))
    config = Step3Config.from_file(args.model)
    total = args.steps * args.rounds + 8
    blocks = -(-(args.context + total + 1) // BS)
    modes = {"bf16": None, "fp8": "fp8"}
    decoders = {}
    for name, q in modes.items():
        ex = ColocatedExecutor(args.model, config, "bfloat16", CacheConfig(BS, blocks), quantization=q)
        dec = Decoder(ex.runner, 1, args.context, total, config.vocab_size)
        for _ in range(4):                      # recorded on the 3rd step, checked on the 4th
            dec.step()
        decoders[name] = dec
    best = {name: float("inf") for name in modes}
    bandwidths = []
    with torch.inference_mode():
        for _ in range(args.rounds):
            bandwidths.append(measure_bandwidth("cpu", 1 << 30, repeats=1)["bytes_per_s"])
            for name, dec in decoders.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    dec.step()
                best[name] = min(best[name], (time.perf_counter() - t) / args.steps)
    m = describe()
    flags = sorted(kernels.cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"machine: {m['cpu']}, flags {flags}, torch {m['torch']}, {torch.get_num_threads()} thread(s); "
          f"batch 1, context {args.context}, fastest of {args.rounds} interleaved rounds of {args.steps} steps")
    top, mid = max(bandwidths), statistics.median(bandwidths)
    print(f"streaming read: highest {top / 1e9:.1f} GB/s, median {mid / 1e9:.1f} GB/s "
          f"(rounds: {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)})")
    for name, q in modes.items():
        nbytes = step_bytes(config, 1, args.context, 2, quantization=q)["total"]
        rate = nbytes / best[name]
        print(f"  {name:5s} {best[name] * 1e3:6.2f} ms/step  {1 / best[name]:6.1f} tok/s  {nbytes / 1e6:6.1f} MB/step  "
              f"{rate / 1e9:5.1f} GB/s = {rate / top:5.1%} of the highest, {rate / mid:5.1%} of the median")
    print(f"  FP8 / bf16: {best['bf16'] / best['fp8']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode graphs on vs off, alternated in one process, and where a replayed step's time goes.

Builds a colocated runner over --model (as the engine does: dtype, quantization, kernel policy),
gives each of --batch sequences a prompt of --context positions (KV written by one real prefill),
times the first 4 decode steps (a batch size is recorded on its 3rd and checked on its 4th),
then runs decode steps with random tokens, switching graphs on and off every --steps steps for
--rounds rounds; each mode keeps its fastest round (ms per step). With --breakdown it then times
every call of a replayed step, grouped (native kernels by function and shape, torch operators,
live attention), over --steps replays with random tokens. With --attention-isas it also alternates
the bf16 decode attention's AVX512-BF16 and AVX2 code (graphs on). Prints the CPU model and flags.

    python benchmarks/decode_graphs_bench.py --model /tmp/small [--batch 1] [--context 128] \
        [--quantization fp8] [--breakdown] [--attention-isas]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import time

import torch

from afdserve.bench.machine import describe
from afdserve.config import Step3Config
from afdserve.engine.executor import CacheConfig, ColocatedExecutor
from afdserve.engine.runner import SeqWork, StepInput
from afdserve.model import kernels
from afdserve.sampling import SampleRequest, SamplingParams

BS = 16


class Decoder:
    """--batch sequences of --context positions, one decode step at a time (random tokens)."""

    def __init__(self, runner, batch: int, context: int, steps_total: int, vocab: int):
        self.runner, self.batch, self.pos, self.vocab = runner, batch, context, vocab
        per_seq = -(-(context + steps_total + 1) // BS)
        self.tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(batch)]
        self.rng = random.Random(0)
        greedy = SampleRequest(SamplingParams(temperature=0.0))
        prompt = [[self.rng.randrange(2, vocab) for _ in range(context)] for _ in range(batch)]
        runner.execute(StepInput([SeqWork(str(s), prompt[s], 0, self.tables[s], greedy) for s in range(batch)]))

    def step_input(self) -> StepInput:
        greedy = SampleRequest(SamplingParams(temperature=0.0))
        seqs = [SeqWork(str(s), [self.rng.randrange(2, self.vocab)], self.pos, self.tables[s], greedy)
                for s in range(self.batch)]
        self.pos += 1
        return StepInput(seqs)

    def step(self) -> None:
        self.runner.execute(self.step_input())


def alternate(dec: Decoder, steps: int, rounds: int, modes: dict) -> dict:
    """Fastest ms per step of each mode over `rounds` alternations of `steps` steps; `modes` maps a
    mode to the callable that switches it on."""
    best = {mode: float("inf") for mode in modes}
    for _ in range(rounds):
        for mode, switch in modes.items():
            switch()
            t = time.perf_counter()
            for _ in range(steps):
                dec.step()
            best[mode] = min(best[mode], (time.perf_counter() - t) / steps * 1e3)
    return best


def alternate_graphs(dec: Decoder, steps: int, rounds: int) -> dict[str, float]:
    """Decode graphs "on" and "off"; left on."""
    graphs = dec.runner.graphs
    try:
        return alternate(dec, steps, rounds, {m: (lambda m=m: setattr(graphs, "mode", m)) for m in ("on", "off")})
    finally:
        graphs.mode = "on"


@torch.inference_mode()
def alternate_attention(dec: Decoder, steps: int, rounds: int) -> dict[bool, float]:
    """The bf16 decode attention on AVX512-BF16 (True) and AVX2 (False); the policy restored."""
    base = kernels.current_policy()
    try:
        return alternate(dec, steps, rounds, {dp: (lambda dp=dp: kernels.use_policy(
            dataclasses.replace(base, attention_dp=dp))) for dp in (False, True)})
    finally:
        kernels.use_policy(base)


def _kind(op) -> str:
    """A recorded call's group: native function (+ GEMM shape), torch operator, or live attention."""
    cells = dict(zip(op.__code__.co_freevars, (c.cell_contents for c in op.__closure__ or ())))
    if "again" in op.__qualname__:
        return "live attention (paged_attention)"
    if "fn" in cells:
        fn, a = cells["fn"], cells["args"]
        if fn.__name__ == "bgemm":
            return f"bgemm N={a[5]} M={a[6]} K={a[8]}"
        if fn.__name__ == "gemm_bf16":                    # afdserve._fp8: FP8 weights
            return f"fp8 gemm N={a[11]} M={a[10]} K={a[12]}"
        return f"native {fn.__name__}"
    return "torch operators"


@torch.inference_mode()
def breakdown(dec: Decoder, steps: int) -> list[tuple[str, int, float]]:
    """(group, calls per step, ms per step) of a replayed step, largest first."""
    graph = dec.runner.graphs.graphs.get(dec.batch)
    if graph is None or not graph.validated:
        raise SystemExit("no checked graph for this batch size (see the afdserve.graphs warning)")
    kinds = [_kind(op) for op in graph.ops]
    total = collections.defaultdict(float)
    for _ in range(steps):
        step = dec.step_input()
        ids = torch.tensor([s.token_ids[0] for s in step.seqs])
        meta = dec.runner._metadata(step)
        graph.ids.copy_(ids)
        graph.positions.copy_(meta.positions)
        graph.slots.copy_(meta.slot_mapping)
        graph._meta = meta.select(slice(0, dec.batch))
        for kind, op in zip(kinds, graph.ops):
            t = time.perf_counter()
            op()
            total[kind] += time.perf_counter() - t
    graph._meta = None
    counts = collections.Counter(kinds)
    return sorted(((k, counts[k], v / steps * 1e3) for k, v in total.items()), key=lambda r: -r[2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (e.g. afdserve init-checkpoint --preset small)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="steps per round and mode")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--breakdown", action="store_true", help="also time every call of a replayed step")
    ap.add_argument("--attention-isas", action="store_true",
                    help="also alternate the bf16 decode attention's AVX2 and AVX512-BF16 code (graphs on)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Step3Config.from_file(args.model)
    total = (4 if args.attention_isas else 2) * args.steps * args.rounds + 8 + (args.steps if args.breakdown else 0)
    blocks = args.batch * -(-(args.context + total + 1) // BS)
    ex = ColocatedExecutor(args.model, config, args.dtype, CacheConfig(BS, blocks), quantization=args.quantization)
    dec = Decoder(ex.runner, args.batch, args.context, total, config.vocab_size)
    first = []
    for _ in range(4):                     # recorded on the 3rd step, checked on the 4th
        t = time.perf_counter()
        dec.step()
        first.append((time.perf_counter() - t) * 1e3)
    m = describe()
    flags = sorted(kernels.cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"machine: {m['cpu']}, flags {flags}, torch {m['torch']}, {torch.get_num_threads()} thread(s); "
          f"{args.dtype}{' + FP8 weights' if args.quantization else ''}, batch {args.batch}, context {args.context}")
    graph = dec.runner.graphs.graphs.get(args.batch)
    if graph is None:
        print(f"no graph: {dec.runner.graphs.refused}")
    else:
        print(f"graph: {len(graph.ops)} recorded calls, {graph.nbytes / 2**20:.2f} MiB of intermediates kept")
    print("first decode steps: " + ", ".join(f"{ms:.1f}" for ms in first) + " ms (normal, normal, recorded, checked)")
    best = alternate_graphs(dec, args.steps, args.rounds)
    print(f"graphs on {best['on']:.2f} ms/step, off {best['off']:.2f} ms/step: {best['off'] / best['on']:.2f}x "
          f"(fastest of {args.rounds} alternated rounds of {args.steps} steps)")
    if args.attention_isas:
        if not kernels.current_policy().attention_dp:
            print("attention ISAs: this run has no AVX512-BF16 decode attention to compare (dtype / CPU)")
        else:
            isa = alternate_attention(dec, args.steps, args.rounds)
            print(f"decode attention AVX512-BF16 {isa[True]:.2f} ms/step, AVX2 {isa[False]:.2f} ms/step: "
                  f"{isa[False] / isa[True]:.2f}x (fastest of {args.rounds} alternated rounds)")
    if args.breakdown:
        rows = breakdown(dec, args.steps)
        for kind, n, ms in rows:
            print(f"  {ms:7.3f} ms  {n:4d} calls  {kind}")
        print(f"  {sum(r[2] for r in rows):7.3f} ms  replayed step, call by call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode throughput: colocated vs AFD 1A1F with m = 1, 2, 3 micro-batches, in one run.

    python benchmarks/afd_bench.py [--quick] [--batch-sizes 4,16,32] [--latency-ms 2] [--json out.json]

A random checkpoint of the preset (default `small`) is written to a temp dir. For each batch size,
B requests are prefilled (not timed), then `--steps` decode steps are timed with engine.step().
Equal footing: `--threads` (default: the cores this process may use) is the run's total; each of
the two AFD worker processes gets threads // 2 (passed to the executor as threads_per_worker),
colocated runs once with all of them (`vs colocated`: same total cores) and once with one worker's
share (`vs share`: the same threads, so the same kernel choice, as each AFD worker: what
disaggregation itself costs or gains). The kernels each row runs are printed with it. `--latency-ms` adds a run with emulated link latency (the connector
holds each A->F message until send time + 2 x latency) to show how much of it the micro-batch
pipeline hides; the traces' hidden fraction = 1 - (attention-side wait) / (round-trip time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


def machine() -> dict:
    from afdserve.bench.vllm_peer import cpu_description
    cpu = cpu_description()
    return {"cpu": cpu["cpu"], "cpu_flags": cpu["flags"], "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "load_avg": os.getloadavg()}


def decode_rate(llm, batch: int, steps: int, prompt_len: int = 8) -> float:
    from afdserve.sampling import SamplingParams
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for b in range(batch):
        eng.add_request(f"r{time.monotonic_ns()}-{b}", [(b * 7 + i) % 100 + 1 for i in range(prompt_len)], params)
    while eng.stats().num_waiting:          # prefill everything first (not timed)
        eng.step()
    eng.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    dt = time.perf_counter() - t0
    while eng.has_unfinished_requests():
        eng.step()
    return batch * steps / dt


def run(args) -> dict:
    from afdserve.bench.cli import kernel_policy
    from afdserve.config import get_preset
    from afdserve.engine.llm import LLM
    from afdserve.model.checkpoint import init_checkpoint

    share = max(1, args.threads // 2)                 # 1A1F: two local worker processes
    out = {"machine": machine(), "preset": args.preset, "steps": args.steps, "threads": args.threads,
           "threads_per_worker": share, "results": []}
    print("machine:", json.dumps(out["machine"]))
    print(f"threads: {args.threads} in all; AFD 1A1F: {share} per worker ({kernel_policy(share)}); colocated: "
          f"{args.threads} ({kernel_policy(args.threads)}) and one worker's share, {share}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        ckpt = init_checkpoint(get_preset(args.preset), tmp, seed=0)
        print(f"checkpoint ({args.preset}) written in {time.time() - t:.1f} s")
        common = dict(model=str(ckpt), device="cpu", max_num_seqs=max(args.batch_sizes), num_kv_blocks=256,
                      block_size=16)
        colo = {}
        for threads in dict.fromkeys([args.threads, share]):
            torch.set_num_threads(threads)
            with LLM(**common) as llm:
                colo[threads] = {b: decode_rate(llm, b, args.steps) for b in args.batch_sizes}
        torch.set_num_threads(args.threads)
        for threads, rates in colo.items():
            for b, r in rates.items():
                _report(out, "colocated", b, 1, 0.0, r, colo, threads, {})
        for lat in [0.0] + ([args.latency_ms] if args.latency_ms else []):
            opts = {"timeout_s": 120, "link_latency_ms": lat, "threads_per_worker": share}
            with LLM(afd="1A1F", micro_batches=3, afd_options=opts, **common) as llm:
                ex = llm.engine.executor
                for m in args.micro_batches:
                    ex.set_micro_batches(m)
                    for b in args.batch_sizes:
                        ex.traces.steps.clear()
                        rate = decode_rate(llm, b, args.steps)
                        _report(out, "afd-1A1F", b, m, lat, rate, colo, share, ex.trace_summary())
    return out


def _report(out, mode, batch, m, lat, rate, colo, threads, summary) -> None:
    from afdserve.bench.cli import kernel_policy
    full, share = colo[out["threads"]][batch], colo[out["threads_per_worker"]][batch]
    row = {"mode": mode, "batch": batch, "micro_batches": m, "link_latency_ms": lat, "threads": threads,
           "kernels": kernel_policy(threads), "tokens_per_s": rate, "vs_colocated": rate / full,
           "vs_colocated_share": rate / share, **{k: round(v, 4) for k, v in summary.items()}}
    out["results"].append(row)
    extra = ""
    if summary:
        extra = (f"  step {summary['afd_step_ms']:.1f} ms: attn {summary['afd_attention_ms']:.1f}, "
                 f"ffn {summary['afd_ffn_ms']:.1f}, wait {summary['afd_comm_wait_ms']:.1f} "
                 f"(bubble {summary['afd_bubble_fraction']:.0%}, hidden {summary['afd_hidden_fraction']:.0%})")
    print(f"{mode:10s} B={batch:3d} m={m} lat={lat:g}ms threads={threads} ({row['kernels']})  {rate:8.1f} tok/s  "
          f"vs colocated x{row['vs_colocated']:.2f}, vs share x{row['vs_colocated_share']:.2f}{extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-sizes", default="4,16,32")
    p.add_argument("--micro-batches", default="1,2,3")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads in all (default: this process's cores); each AFD worker gets half")
    p.add_argument("--latency-ms", type=float, default=2.0, help="emulated link latency for the extra run (0: none)")
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 8, 4 steps")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()
    if args.quick:
        args.preset, args.batch_sizes, args.steps = "tiny", "8", 4
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.micro_batches = [int(x) for x in args.micro_batches.split(",")]
    out = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

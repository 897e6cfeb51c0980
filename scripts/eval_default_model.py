#!/usr/bin/env python
"""Score a model on held-out task prompts through afdserve's public API, colocated and AFD.

    python scripts/eval_default_model.py                 # the embedded default model
    python scripts/eval_default_model.py --n 500 --json eval.json
    python scripts/eval_default_model.py --model DIR --afd none --formats chat,completion
    python scripts/eval_default_model.py --n 100 --formats chat --afd none --kv-cache-dtype fp8

Greedy decoding (temperature 0), exact match per task and overall (afdserve.tasks.score). The
held-out prompts are questions the training script never saw (afdserve.tasks split by hash).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afdserve import LLM, SamplingParams, tasks  # noqa: E402
from afdserve.config import KV_CACHE_DTYPES  # noqa: E402


def run_mode(model: str | None, afd: str | None, examples, fmts: list[str], max_tokens: int,
             kv_cache_dtype: str = "auto", quantization: str | None = None) -> dict:
    """Generate for every (format, example) with one engine; returns per-format scores and answers."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    with LLM(model=model, afd=afd, kv_cache_dtype=kv_cache_dtype, quantization=quantization) as llm:
        load_s = time.perf_counter() - t0
        add_bos = llm.tokenizer.add_bos
        result = {"load_s": round(load_s, 2), "formats": {}}
        for fmt in fmts:
            # The tokenizer prepends <s> itself when add_bos_token is set; otherwise the prompt carries it
            # (as the chat template's output does).
            prompts = [tasks.format_prompt(e.prompt, fmt, bos=not add_bos) for e in examples]
            t1 = time.perf_counter()
            outs = llm.generate(prompts, params)
            gen_s = time.perf_counter() - t1
            answers = [o.outputs[0].text for o in outs]
            sc = tasks.score(examples, answers)
            sc["generate_s"] = round(gen_s, 2)
            sc["answers"] = [a.strip() for a in answers]
            sc["finish_reasons"] = [o.outputs[0].finish_reason for o in outs]
            result["formats"][fmt] = sc
    return result


def print_scores(label: str, res: dict) -> None:
    for fmt, sc in res["formats"].items():
        per = ", ".join(f"{t} {100 * r['accuracy']:.1f}%" for t, r in sc["per_task"].items())
        print(f"{label:<12} {fmt:<11} overall {100 * sc['overall']:5.1f}% of {sc['n']}  ({per})  "
              f"[{sc['generate_s']:.1f}s]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded default model)")
    ap.add_argument("--n", type=int, default=250, help="held-out prompts (balanced over the tasks)")
    ap.add_argument("--seed", type=int, default=99, help="seed of the held-out sample")
    ap.add_argument("--afd", default="1A1F", help="AFD topology to compare against, or 'none'")
    ap.add_argument("--formats", default="chat,completion",
                    help=f"comma-separated prompt formats from {', '.join(tasks.FORMATS)}")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                    help="auto: the KV cache in the run's dtype; fp8: 8-bit e4m3 (docs/fp8.md)")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="fp8: block-scaled FP8 linear weights, quantized at load (docs/fp8.md)")
    ap.add_argument("--examples", type=int, default=8, help="example prompts/answers to print")
    ap.add_argument("--json", default=None, help="write every score and answer here")
    args = ap.parse_args(argv)

    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in fmts:
        if f not in tasks.FORMATS:
            ap.error(f"unknown format {f!r}")
    examples = tasks.heldout_set(args.n, seed=args.seed)
    report = {"model": args.model or "default", "n": len(examples), "seed": args.seed,
              "prompts": [e.prompt for e in examples], "expected": [e.answer for e in examples],
              "tasks": [e.task for e in examples], "modes": {}}

    modes = [("colocated", None)]
    if args.afd.lower() != "none":
        modes.append((f"afd-{args.afd}", args.afd))
    for label, afd in modes:
        try:
            res = run_mode(args.model, afd, examples, fmts, args.max_tokens, args.kv_cache_dtype,
                           args.quantization)
        except Exception as exc:  # the AFD runtime may be missing or unable to start here
            if afd is None:
                raise
            print(f"{label:<12} AFD unavailable: {type(exc).__name__}: {exc}")
            report["modes"][label] = {"error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()}
            continue
        report["modes"][label] = res
        print_scores(label, res)

    ok = {k: v for k, v in report["modes"].items() if "error" not in v}
    if len(ok) == 2:
        (la, a), (lb, b) = ok.items()
        for fmt in fmts:
            same = sum(x == y for x, y in zip(a["formats"][fmt]["answers"], b["formats"][fmt]["answers"]))
            print(f"{la} and {lb} agree on {same}/{len(examples)} {fmt} answers")
            report.setdefault("agreement", {})[fmt] = same / len(examples)

    first = next(iter(ok.values()))["formats"][fmts[0]]
    print(f"\nexamples ({fmts[0]} format, colocated):")
    shown = []
    for task in tasks.SUITE:       # one per task first, then in order
        shown += [i for i, e in enumerate(examples) if e.task == task][:1]
    shown += [i for i in range(len(examples)) if i not in shown]
    for i in shown[:args.examples]:
        e, got = examples[i], first["answers"][i]
        mark = "ok " if tasks.normalize(got) == tasks.normalize(e.answer) else "BAD"
        print(f"  [{mark}] {e.prompt!r:<34} -> {got!r}  (expected {e.answer!r})")

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

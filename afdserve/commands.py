"""Sub-commands for the model itself: `init-checkpoint`, `generate`, `demo`."""
from __future__ import annotations

import argparse
import os
import time

from afdserve.afd.options import add_afd_arguments, engine_kwargs_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-checkpoint", help="write a random-initialised checkpoint of a preset",
                       description="Write config.json + model.safetensors (HF tensor names) with random "
                       "weights, so every feature can be tried without downloading anything.")
    p.add_argument("--preset", required=True, help="step3, small or tiny")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "fp8"],
                   help="fp8: block-scaled e4m3 linear weights + bfloat16 for the rest (docs/fp8.md)")
    p.set_defaults(func=_init_checkpoint)

    g = sub.add_parser("generate", help="generate text or token ids offline",
                       description="Generate from a prompt with the offline LLM API (greedy by default).")
    g.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop-token-ids", default="", help="comma-separated ids that end generation")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 where the checkpoint is bf16 or the CPU has bf16 arithmetic, else float32")
    add_kernels_argument(g)
    add_quantization_argument(g)
    add_kv_cache_dtype_argument(g)
    add_afd_arguments(g)
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="answer a few questions with the embedded model, colocated and AFD",
                       description="Run the main job on the embedded default model: held-out questions "
                       "answered colocated and through Attention-FFN Disaggregation (1A1F), with the score.")
    d.add_argument("--model", default=None)
    d.add_argument("--n", type=int, default=40, help="held-out prompts to score")
    d.add_argument("--afd", default="1A1F", help="topology for the disaggregated run ('none' to skip)")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    add_kv_cache_dtype_argument(d)
    add_kernels_argument(d)
    d.set_defaults(func=_demo)


def add_kernels_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=["auto", "native", "torch"], default=None,
                   help="decode kernel policy (default: $AFDSERVE_KERNELS or auto; docs/kernels.md): auto = the "
                   "fastest measured per shape, native = afdserve's own kernels, torch = torch's only")
    p.add_argument("--decode-graphs", choices=["on", "off", "check"], default=None,
                   help="replay recorded decode steps without their Python (default: $AFDSERVE_DECODE_GRAPHS or "
                   "on; docs/graphs.md); check = compare every replay with a normal step")


def apply_kernels_argument(args: argparse.Namespace) -> None:
    """Install --kernels and --decode-graphs for this process and the workers it starts (environment)."""
    from afdserve.engine.graphs import GRAPHS_ENV, graphs_mode
    from afdserve.model.kernels import apply_kernels_argument as apply
    apply(args)
    if getattr(args, "decode_graphs", None):
        os.environ[GRAPHS_ENV] = args.decode_graphs
        graphs_mode()


def add_quantization_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: quantize the linear weights to block-scaled FP8 at load (8 bits in memory; an "
                   "FP8 checkpoint loads as FP8 without this flag; docs/fp8.md)")


def add_kv_cache_dtype_argument(p: argparse.ArgumentParser) -> None:
    from afdserve.config import KV_CACHE_DTYPES
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="auto: the KV cache in the run's dtype; fp8: float8 e4m3, 1 byte per element (twice the "
                   "blocks of bf16 for the same memory; docs/fp8.md)")


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated token ids, got {text!r}") from None


def _init_checkpoint(args: argparse.Namespace) -> int:
    from afdserve.config import get_preset
    from afdserve.model.checkpoint import init_checkpoint

    config = get_preset(args.preset)
    out = init_checkpoint(config, args.out, seed=args.seed, dtype=args.dtype)
    n = config.num_parameters()
    print(f"wrote {args.preset} checkpoint to {out} ({n['total'] / 1e6:.1f}M parameters, {args.dtype})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from afdserve import LLM, SamplingParams

    apply_kernels_argument(args)
    prompts = args.prompt if args.prompt else [_ids(p) for p in args.prompt_ids]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens,
                            stop_token_ids=_ids(args.stop_token_ids))
    with LLM(model=args.model, dtype=args.dtype, quantization=args.quantization,
             kv_cache_dtype=args.kv_cache_dtype, **engine_kwargs_from_args(args)) as llm:
        if args.prompt and llm.tokenizer is None:
            raise ValueError("this model has no tokenizer.json: use --prompt-ids")
        for out in llm.generate(prompts, params):
            c = out.outputs[0]
            print(c.text if llm.tokenizer is not None else ",".join(map(str, c.token_ids)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from afdserve import LLM, SamplingParams
    from afdserve.tasks import format_prompt, heldout_set, score

    console = Console()
    apply_kernels_argument(args)
    examples = heldout_set(args.n)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    modes = [("colocated", None)] + ([] if args.afd.lower() == "none" else [(f"AFD {args.afd}", args.afd)])
    answers = {}
    for label, afd in modes:
        t0 = time.perf_counter()
        with LLM(model=args.model, afd=afd, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype) as llm:
            if llm.tokenizer is None:
                raise ValueError("the demo needs a model with a tokenizer (the embedded default model has one)")
            # The chat template's form of each question; the tokenizer adds BOS itself when configured to.
            prompts = [format_prompt(e.prompt, "chat", bos=not llm.tokenizer.add_bos) for e in examples]
            outs = llm.generate(prompts, params)
        answers[label] = [o.outputs[0].text.strip() for o in outs]
        acc = score(examples, answers[label])
        console.print(f"[bold]{label}[/]: {acc['overall']:.1%} exact match on {len(examples)} held-out "
                      f"prompts ({time.perf_counter() - t0:.1f}s)")
    table = Table(title="embedded default model, greedy")
    table.add_column("prompt")
    table.add_column("expected")
    for label, _ in modes:
        table.add_column(label)
    for i, e in enumerate(examples[:10]):
        table.add_row(e.prompt, e.answer, *[answers[label][i] for label, _ in modes])
    console.print(table)
    if len(modes) == 2:
        same = sum(a == b for a, b in zip(*answers.values()))
        console.print(f"colocated and {modes[1][0]} agree on {same}/{len(examples)} answers")
    return 0

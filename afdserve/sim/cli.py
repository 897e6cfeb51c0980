"""`afdserve simulate` and `afdserve plan`: the deployment simulator on the command line (no torch).

    afdserve simulate --model step3 --afd 2A2F --gpus-per-instance 8 --attention-hw H800 \\
        --ffn-hw H800 --context 4096 [--batch 6144] [--micro-batches 3] [--tpot-ms 50] \\
        [--attention-precision fp8|bf16] [--json] [--timeline step.png]
    afdserve simulate --model deepseek-v3 --colocated-ep 128 --hardware H800 --context 4096 \\
        --tpot-ms 50 [--json]
    afdserve plan --model step3 --hardware H800,H20 --context 8192 --tpot-ms 50 \\
        [--max-gpus 128] [--json] [--plot out.png]

User errors raise CLIError / ValueError; `afdserve.cli.main` prints one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from afdserve.cost.arch import MODEL_PRESETS, get_model
from afdserve.cost.cli import _clean, parse_context
from afdserve.cost.hardware import HARDWARE_PRESETS, get_hardware, parse_prices, \
    resolve_hardware, with_price
from afdserve.sim.simulator import Deployment, SimPrecision, load_efficiency, \
    max_batch_for_tpot, parse_afd, simulate

PAPER_KEYS = ("tokens_per_gpu_s", "tpot_ms", "batch", "gpus", "stage_us", "bottleneck")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"preset ({', '.join(MODEL_PRESETS)}) or config.json path")
    p.add_argument("--context", default="4096", help="average context length (e.g. 4096 or "
                   "8k; default 4096)")
    p.add_argument("--tpot-ms", type=float, default=50.0,
                   help="time-per-output-token target in ms (default 50)")
    p.add_argument("--attention-precision", default="fp8", choices=("fp8", "bf16"),
                   help="attention projections and KV cache: fp8 = FP8 projection GEMMs + 8-bit KV, "
                        "bf16 = BF16 both; the attention core runs BF16 in both, as in the report "
                        "(default fp8)")
    p.add_argument("--gpus-per-instance", type=int, default=8,
                   help="GPUs per AFD instance (default 8)")
    p.add_argument("--price", action="append", default=[], metavar="NAME=USD_PER_HOUR",
                   help="override a chip's price per card-hour")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(subparsers: argparse._SubParsersAction) -> None:
    chips = ", ".join(HARDWARE_PRESETS)
    s = subparsers.add_parser(
        "simulate", help="simulate one decode step of an AFD or colocated deployment",
        description="Layer-by-layer, micro-batch-by-micro-batch simulation of a decode step: "
        "TPOT, tokens/GPU/s, per-stage times, bottleneck, memory check. Give --afd xAyF or "
        "--colocated-ep N.")
    _common(s)
    s.add_argument("--afd", metavar="xAyF", help="AFD shape, e.g. 2A2F")
    s.add_argument("--colocated-ep", type=int, metavar="N",
                   help="colocated DP-attention + EP-MoE over N GPUs (DeepSeek-style)")
    s.add_argument("--attention-hw", help=f"attention chip ({chips})")
    s.add_argument("--ffn-hw", help="FFN chip")
    s.add_argument("--hardware", help="chip for both sides (colocated, or AFD default)")
    s.add_argument("--batch", type=int, help="running sequences in the whole deployment "
                   "(default: the largest that meets --tpot-ms)")
    s.add_argument("--micro-batches", type=int,
                   help="micro-batches per step (default 3 for AFD, 2 colocated)")
    s.add_argument("--timeline", metavar="PNG",
                   help="draw the predicted steady-state step as a Gantt chart (rows = resources, "
                        "colours = stages, as `afdserve trace plot` draws a measured one)")
    s.set_defaults(func=run_simulate)

    p = subparsers.add_parser(
        "plan", help="search deployments for a TPOT target, rank by tokens/GPU/s and cost",
        description="Search AFD xAyF shapes (heterogeneous attention/FFN chips allowed) and "
        "colocated EP widths, micro-batch counts and batch sizes against a TPOT target.")
    _common(p)
    p.add_argument("--hardware", default="H800",
                   help=f"comma-separated chips to combine (default H800; {chips})")
    p.add_argument("--max-gpus", type=int, default=128, help="GPU budget (default 128)")
    p.add_argument("--top", type=int, default=10, help="rows per ranking (default 10)")
    p.add_argument("--plot", metavar="PNG",
                   help="draw tokens/GPU/s against TPOT per deployment family")
    p.set_defaults(func=run_plan)


def _chip(name: str | None, prices: dict[str, float]):
    hw = get_hardware(name)
    return with_price(hw, prices[hw.name]) if hw.name in prices else hw


def build_deployment(args: argparse.Namespace) -> Deployment:
    prices = parse_prices(args.price)
    if bool(args.afd) == bool(args.colocated_ep):
        raise ValueError("give exactly one of --afd xAyF or --colocated-ep N")
    if args.gpus_per_instance < 1:
        raise ValueError(f"--gpus-per-instance must be >= 1, got {args.gpus_per_instance}")
    if args.afd:
        x, y = parse_afd(args.afd)
        a_name = args.attention_hw or args.hardware
        f_name = args.ffn_hw or args.hardware
        if not a_name or not f_name:
            raise ValueError("AFD needs --attention-hw and --ffn-hw (or --hardware for both)")
        return Deployment("afd", _chip(a_name, prices), _chip(f_name, prices), x, y,
                          args.gpus_per_instance, micro_batches=args.micro_batches or 3)
    if args.attention_hw or args.ffn_hw:
        raise ValueError("colocated deployments use --hardware, not --attention-hw/--ffn-hw")
    hw = _chip(args.hardware or "H800", prices)
    return Deployment("colocated", hw, hw, ep=args.colocated_ep,
                      micro_batches=args.micro_batches or 2)


def run_simulate(args: argparse.Namespace) -> int:
    arch = get_model(args.model)
    dep = build_deployment(args)
    context = parse_context(args.context)
    prec = SimPrecision.for_attention(args.attention_precision)
    eff = load_efficiency("gpu")
    if args.batch is not None:
        result = simulate(arch, dep, context, args.batch, prec, eff)
    else:
        result = max_batch_for_tpot(arch, dep, context, args.tpot_ms, prec, eff)
        if result is None:
            raise ValueError(f"{dep.name} cannot meet TPOT {args.tpot_ms:g} ms at context "
                             f"{context} even with one sequence per GPU per micro-batch")
    if args.timeline:
        from afdserve.sim.plots import plot_timeline
        from afdserve.sim.simulator import schedule
        plot_timeline(schedule(arch, dep, context, result.batch, prec, eff), args.timeline,
                      f"{arch.name} on {dep.name}, batch {result.batch}, context {context}: predicted step "
                      f"(TPOT {result.tpot_ms:.2f} ms)")
        print(f"wrote {args.timeline}", file=sys.stderr)
    out = result.to_dict()
    out["tpot_ms_target"] = args.tpot_ms
    out["meets_tpot"] = result.tpot_ms <= args.tpot_ms
    if args.json:
        import json
        print(json.dumps(_clean(out), indent=2))
    else:
        _print_simulation(out)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from afdserve.sim.planner import PlanQuery, pareto, plan
    hardware = tuple(resolve_hardware(args.hardware, parse_prices(args.price)))
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    q = PlanQuery(get_model(args.model), hardware, parse_context(args.context), args.tpot_ms,
                  args.max_gpus, args.gpus_per_instance, args.attention_precision)
    eff = load_efficiency("gpu")
    report = plan(q, eff, top=args.top)
    if args.plot:
        from afdserve.sim.plots import plot_pareto
        targets = sorted({args.tpot_ms, *(t for t in (20, 30, 40, 50, 70, 100, 150))})
        plot_pareto(pareto(q, targets, eff), args.plot, args.tpot_ms)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        import json
        print(json.dumps(_clean(report), indent=2))
    else:
        _print_plan(report)
    return 0


# ----- output -----

def _print_simulation(r: dict) -> None:
    from afdserve.cost.cli import _console, _table
    con = _console()
    con.print(f"[bold]{r['model']}[/bold] on {r['deployment']} ({r['gpus']} GPUs), context "
              f"{r['context']}, {r['attention_precision']} attention, batch {r['batch']} in "
              f"{r['micro_batches']} micro-batches")
    t = _table("Decode step (steady state)", ["TPOT ms", "target", "tokens/GPU/s",
               "USD/1M tok", "bottleneck", "memory"])
    t.add_row(f"{r['tpot_ms']:.2f}", f"{r['tpot_ms_target']:g}", f"{r['tokens_per_gpu_s']:,.0f}",
              f"{r['usd_per_mtok']:.3f}", r["bottleneck"], "fits" if r["fits"] else "DOES NOT FIT")
    con.print(t)
    t = _table("Per layer and micro-batch (MoE layers), us", ["attention", "A->F", "FFN", "F->A"])
    s = r["stage_us"]
    t.add_row(*(f"{s[k]:.1f}" for k in ("attention", "a2f", "ffn", "f2a")))
    con.print(t)
    t = _table("Memory per GPU, GB", ["side", "weights", "KV", "usable", "fits"])
    for side, m in r["memory"].items():
        if isinstance(m, dict):
            t.add_row(side, f"{m['weights_gb']:.1f}", f"{m['kv_gb']:.1f}",
                      f"{m['usable_gb']:.1f}", "yes" if m["fits"] else "NO")
    con.print(t)


def _print_plan(r: dict) -> None:
    from afdserve.cost.cli import _console, _table
    con = _console()
    con.print(f"[bold]{r['model']}[/bold], context {r['context']}, TPOT <= "
              f"{r['tpot_ms_target']:g} ms, chips {','.join(r['hardware'])}, up to "
              f"{r['max_gpus']} GPUs: {r['candidates']} feasible deployments")
    for key, title in (("by_throughput", "Ranked by tokens/GPU/s"),
                       ("by_cost", "Ranked by USD per 1M tokens")):
        t = _table(title, ["deployment", "GPUs", "m", "batch", "TPOT ms", "tokens/GPU/s",
                           "USD/1M tok", "bottleneck"])
        for row in r[key]:
            t.add_row(row["deployment"], str(row["gpus"]), str(row["micro_batches"]),
                      str(row["batch"]), f"{row['tpot_ms']:.1f}",
                      f"{row['tokens_per_gpu_s']:,.0f}", f"{row['usd_per_mtok']:.3f}",
                      row["bottleneck"])
        con.print(t)

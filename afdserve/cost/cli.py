"""`afdserve cost`: the co-design cost model on the command line (no torch).

    afdserve cost --model step3 --context 8192 [--hardware H800,H20] [--price H20=1.0] [--json]
    afdserve cost sparsity --model deepseek-v3 [--json]
    afdserve cost compare --models step3,deepseek-v3 --contexts 4096,8192,32768 [--plot out.png]

User errors raise ValueError; `afdserve.cli.main` prints them as one line with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from afdserve.cost.analysis import Precision, compare_report, cost_report, sparsity_report
from afdserve.cost.arch import MODEL_PRESETS, get_model
from afdserve.cost.hardware import HARDWARE_PRESETS, REPORT_HARDWARE, parse_prices, \
    resolve_hardware

ACTIONS = ("report", "sparsity", "compare")
DEFAULT_CONTEXTS = "4096,8192,32768"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cost", help="decoding cost per 1M tokens, AFD pairing, MoE sparsity (Step-3 report)",
        description="Co-design cost model of the Step-3 report (arXiv 2507.19427 sections 4-5). "
        "Actions: report (default), sparsity, compare.")
    p.add_argument("action", nargs="?", default="report", choices=ACTIONS,
                   help="report (default): per-token work and cost; sparsity: section-5 "
                   "figures; compare: several models and contexts")
    p.add_argument("--model", help=f"preset ({', '.join(MODEL_PRESETS)}) or config.json path")
    p.add_argument("--models", help="compare: comma-separated presets or config paths")
    p.add_argument("--context", default=None, help="context length (e.g. 8192 or 8k; "
                   "default 8192)")
    p.add_argument("--contexts", default=None, help=f"compare: contexts (default "
                   f"{DEFAULT_CONTEXTS})")
    p.add_argument("--hardware", default=None, help="comma-separated chips or 'all' "
                   f"(default {','.join(REPORT_HARDWARE)}; presets: "
                   f"{', '.join(HARDWARE_PRESETS)})")
    p.add_argument("--price", action="append", default=[], metavar="NAME=USD_PER_HOUR",
                   help="override a chip's price per card-hour (repeatable or comma-separated)")
    p.add_argument("--weight-bits", type=int, default=8, choices=(4, 8, 16),
                   help="weight storage bits (default 8)")
    p.add_argument("--kv-bits", type=int, default=8, choices=(4, 8, 16),
                   help="KV cache bits (default 8; hybrid models keep BF16 full layers)")
    p.add_argument("--compute", default="fp8", choices=("fp8", "bf16"),
                   help="compute precision (default fp8; BF16 on chips without FP8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", help="compare: write a figure to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    hardware = resolve_hardware(args.hardware, parse_prices(args.price))
    precision = Precision(weight_bytes=args.weight_bits / 8, kv_bytes=args.kv_bits / 8,
                          compute=args.compute)
    if args.action == "compare":
        return _compare(args, hardware, precision)
    if args.models:
        raise ValueError(f"--models is for 'cost compare'; use --model with {args.action}")
    if args.plot:
        raise ValueError("--plot is for 'cost compare'")
    if not args.model:
        raise ValueError("--model is required (a preset name or a config.json path)")
    arch = get_model(args.model)
    if args.action == "sparsity":
        report = sparsity_report(arch, hardware, precision)
        return _emit(report, args.json, _print_sparsity)
    context = parse_context(args.context if args.context is not None else "8192")
    report = cost_report(arch, context, hardware, precision)
    return _emit(report, args.json, _print_report)


def parse_context(text: str) -> int:
    """'8192', '8k', '32K', '1m' -> tokens; negative or malformed -> ValueError."""
    raw = str(text).strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(raw[-1:], 1)
    number = raw[:-1] if mult > 1 else raw
    try:
        value = int(number) * mult
    except ValueError:
        raise ValueError(f"bad context {text!r}: expected a positive integer such as 8192 "
                         "or 8k") from None
    if value <= 0:
        raise ValueError(f"bad context {text!r}: must be a positive number of tokens")
    return value


def _compare(args: argparse.Namespace, hardware, precision) -> int:
    names = args.models or args.model
    if not names:
        raise ValueError("--models is required for 'cost compare' (e.g. step3,deepseek-v3)")
    if args.context and args.contexts:
        raise ValueError("give --contexts or --context, not both")
    archs = [get_model(n.strip()) for n in names.split(",") if n.strip()]
    contexts = [parse_context(c) for c in (args.contexts or args.context
                                           or DEFAULT_CONTEXTS).split(",") if c.strip()]
    if not archs or not contexts:
        raise ValueError("--models and --contexts must not be empty")
    report = compare_report(archs, contexts, hardware, precision)
    if args.plot:
        from afdserve.cost.plots import plot_compare
        plot_compare(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
        if not args.json:
            return 0
    return _emit(report, args.json, _print_compare)


# ----- output -----

def _clean(obj):
    """JSON-safe (shared by the cost, simulate and bench CLIs): non-finite floats become null,
    keys strings, and anything JSON has no type for its str()."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _emit(report: dict, as_json: bool, printer) -> int:
    if as_json:
        print(json.dumps(_clean(report), indent=2))
    else:
        printer(report)
    return 0


def _console():
    """A rich console (shared by the cost, simulate and bench CLIs); 120 columns when piped."""
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 120)


def _table(title: str, columns: list[str]):
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def _g(x: float) -> str:
    return f"{x:.3g}"


def _precision_text(p: dict) -> str:
    text = (f"{p['weight_bytes'] * 8:.0f}-bit weights, {p['kv_bytes'] * 8:.0f}-bit KV, "
            f"{p['compute']} compute")
    return text + (f", {p['full_layer_kv_bytes'] * 8:.0f}-bit KV in hybrid full layers"
                   if p["full_layer_kv_bytes"] else "")


def _print_report(r: dict) -> None:
    con = _console()
    p, w = r["params"], r["per_token"]
    con.print(f"[bold]{r['model']}[/bold] at context {r['context']}: {p['total'] / 1e9:.1f}B "
              f"parameters, {p['active'] / 1e9:.1f}B active; {_precision_text(r['precision'])}")
    t = _table("Per decoded token (report section 4.1)", ["KV bytes", "attention FLOPs",
               "linear FLOPs", "FFN FLOPs", "attn FLOPs/KV byte"])
    t.add_row(_g(w["kv_bytes"]), _g(w["attention_flops"]), _g(w["linear_flops"]),
              _g(w["ffn_flops"]), f"{r['arithmetic_intensity']:.1f}")
    con.print(t)
    t = _table("USD per 1M tokens per chip (report section 4.2)",
               ["chip", "USD/h", "ridge", "attention", "attn bound", "FFN", "total"])
    for name, c in r["hardware"].items():
        t.add_row(name, f"{c['usd_per_hour']:.2f}", f"{c['ridge']:.0f}",
                  f"{c['attention_usd_per_mtok']:.3f}", c["attention_bound"],
                  f"{c['ffn_usd_per_mtok']:.3f}", f"{c['total_usd_per_mtok']:.3f}")
    con.print(t)
    a, s = r["best_afd"], r["best_single"]
    con.print(f"Best AFD: attention on {a['attention_hardware']} + FFN on {a['ffn_hardware']} "
              f"= [bold]{a['usd_per_mtok']:.3f}[/bold] USD per 1M tokens")
    con.print(f"Best single chip: {s['hardware']} = [bold]{s['usd_per_mtok']:.3f}[/bold] "
              "USD per 1M tokens")
    t = _table("KV capacity of an 8-GPU attention instance", ["chip", "weights/GPU GB",
               "KV B/token", "tokens/GPU", "tokens/instance", "seqs/instance @ctx"])
    for name, k in r["kv_capacity"].items():
        t.add_row(name, f"{k['weight_bytes_per_gpu'] / 1e9:.1f}",
                  f"{k['kv_bytes_per_cached_token']:.0f}", f"{k['tokens_per_gpu']:,}",
                  f"{k['tokens_per_instance']:,}", f"{k['sequences_per_instance_at_context']:,}")
    con.print(t)
    first = next(iter(r["kv_capacity"].values()))
    con.print(f"Capacity assumes {first['assumption']}.")


def _print_sparsity(r: dict) -> None:
    con = _console()
    con.print(f"[bold]{r['model']}[/bold]: sparsity S = {r['activated_experts']}/"
              f"{r['num_experts']} = {r['sparsity']:.3f} (activated incl. shared / routed); "
              f"H={r['hidden_size']}, L={r['num_layers']}, TPOT {r['tpot_s'] * 1e3:.0f} ms, "
              f"{r['stages']} stages")
    t = _table("MoE sparsity against the hardware (report section 5)",
               ["chip", "ridge", "min batch dense", "min batch MoE", "min S (NIC line rate)",
                "min S (measured NIC)", "min active experts", "network bound"])
    for name, c in r["hardware"].items():
        experts = "-" if c["min_active_experts"] is None else f"{c['min_active_experts']:.1f}"
        t.add_row(name, f"{c['ridge']:.0f}", f"{c['min_batch_dense']:.0f}",
                  f"{c['min_batch_moe']:.0f}", f"{c['min_sparsity']:.3f}",
                  f"{c['min_sparsity_measured_nic']:.3f}", experts,
                  f"yes (x{c['ffn_cost_factor']:.2f} FFN cost)" if c["network_bound"] else "no")
    con.print(t)


def _print_compare(r: dict) -> None:
    con = _console()
    ctx = r["contexts"]
    t = _table("USD per 1M tokens, best AFD pairing (attention chip + FFN chip)",
               ["model"] + [f"ctx {c}" for c in ctx] + [f"AI @ {ctx[-1]} (FLOPs/B)"])
    for name, m in r["models"].items():
        cells = [f"{cost:.3f} ({a}+{f})" for cost, a, f in
                 zip(m["best_afd_usd_per_mtok"], m["attention_hardware"], m["ffn_hardware"])]
        t.add_row(name, *cells, f"{m['arithmetic_intensity'][-1]:.1f}")
    con.print(t)
    ridges = ", ".join(f"{k} {v:.0f}" for k, v in r["ridges"].items())
    con.print(f"Chip rooflines (ridge, FLOPs/byte): {ridges}")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m afdserve.cost.cli ...`), same errors as `afdserve cost`."""
    parser = argparse.ArgumentParser(prog="afdserve")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cost", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"afdserve cost: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

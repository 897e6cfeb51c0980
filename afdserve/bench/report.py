"""Markdown summary of a bench result (written to OUT/summary.md; pasted into benchmarks/README.md)."""
from __future__ import annotations

from afdserve.bench.cli import limits_lines


def _g(x, unit=1.0, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x / unit)


def markdown(r: dict) -> str:
    m, d = r["machine"], r["machine"]["description"]
    lines = [f"Command: `{r['command']}` ({r.get('started', '')}, {r.get('elapsed_s', 0):.0f} s)", "",
             f"Machine: {d['cpu']}, {d['cores']} cores, {d['torch_threads']} torch threads, torch {d['torch']}, "
             f"transformers {d.get('transformers')}, device {d['device']}" + (f" ({d['gpu']})" if d.get("gpu") else "")
             + f"; memory available {d.get('mem_available_gb')} GiB; load average (1 min) at start "
             f"{d.get('load_average_1m')}.", "",
             "Measured limits (what every percentage below divides by):", "",
             *[f"- {line}" for line in limits_lines(m)], "",
             "| batch | context | tok/s | TPOT ms | MB/step | % of BW | % of matmul | experts hit/layer | peer tok/s | ours/peer |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r.get("decode", []):
        if "roofline" not in row:
            lines.append(f"| {row['batch']} | {row['context']} | {row.get('skipped') or row.get('error')} "
                         "| | | | | | | |")
            continue
        rf, p = row["roofline"], row.get("peer", {})
        lines.append(f"| {row['batch']} | {row['context']} | {row['tokens_per_s']:.1f} | {row['tpot_ms']:.1f} | "
                     f"{rf['bytes_per_step'] / 1e6:.0f} | {100 * rf['bandwidth_fraction']:.1f} | "
                     f"{100 * rf['matmul_fraction']:.1f} | {rf['distinct_experts_per_moe_layer']:.1f} | "
                     f"{_g(p.get('tokens_per_s'))} | "
                     + (f"{row['ratio_vs_peer']:.2f}x |" if "ratio_vs_peer" in row else "- |"))
    lines.append("")
    for name, v in r.get("targets", {}).items():
        lines.append(f"- target `{name}`: {v['value']:.3g} (target {v['target']}): "
                     + ("**met**" if v["met"] else "**not met**"))
    attn = r.get("attention", {}).get("rows")
    if attn:
        lines += ["", f"Attention layer, one decode step, batch {attn[0]['batch']}:", "",
                  "| design | context | KV elems/token | FLOP/KV byte | measured ms | cost model ms | bound | model/measured |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        for a in attn:
            lines.append(f"| {a['design']} | {a['context']} | {a['kv_elems_per_token']} | "
                         f"{a['arithmetic_intensity']:.0f} | {1e3 * a['step_s']:.3f} | {1e3 * a['predicted_s']:.3f} | "
                         f"{a['bound']} | {a['efficiency']:.2f} |")
    afd = r.get("afd", {})
    if afd.get("rows"):
        lines += ["", f"Colocated vs AFD, batch {afd['rows'][0]['batch']}, context {afd['rows'][0]['context']} "
                  f"({afd.get('note', '')}):", "",
                  "| mode | threads | kernels | tok/s | TPOT ms | vs colocated | vs share |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for a in afd["rows"]:
            if "tokens_per_s" in a:
                lines.append(f"| {a['mode']} | {a.get('threads', '')} | {a.get('kernels', '')} | "
                             f"{a['tokens_per_s']:.1f} | {a['tpot_ms']:.1f} | "
                             + " | ".join(f"{a[k]:.2f}x" if k in a else "-"
                                          for k in ("vs_colocated", "vs_colocated_share")) + " |")
            else:
                lines.append(f"| {a['mode']} | {a.get('threads', '')} | | unavailable: "
                             f"{a.get('unavailable', '')[:80]} | | | |")
    return "\n".join(lines) + "\n"

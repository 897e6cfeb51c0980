"""`afdserve trace`: look at a pipeline trace written by --afd-trace-file (Chrome trace-event JSON).

    afdserve trace validate TRACE              check it against the trace-event format
    afdserve trace plot TRACE [--step N] --out step.png
    afdserve trace compare TRACE [--context C] [--figures cpu.json]

`compare` predicts the traced run with the simulator, measured on this machine (the
`afdserve.sim.local` figures: memory bandwidth, decode-GEMM rates, layer overheads, gloo
latency), and prints every stage measured (median over the trace's busy steps) against
predicted, with the error; then the straggler: the worker whose lateness the others spent the
most time waiting for.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from afdserve.afd.timeline import load_trace, plot_gantt, step_rows, validate_trace
from afdserve.afd.trace import A2F, A2F_WAIT, ATTENTION, F2A, F2A_WAIT, FFN


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="validate, draw or compare an AFD pipeline trace",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    v = sub.add_parser("validate", help="check a trace file against the Chrome trace-event format")
    v.add_argument("trace")
    v.set_defaults(func=run_validate)
    g = sub.add_parser("plot", help="draw one step as a Gantt chart (rows = workers, colours = stages)")
    g.add_argument("trace")
    g.add_argument("--step", type=int, default=None, help="engine step (default: the last step with tokens)")
    g.add_argument("--out", required=True, metavar="PNG")
    g.set_defaults(func=run_plot)
    c = sub.add_parser("compare", help="measured vs simulated per stage, and the straggler")
    c.add_argument("trace")
    c.add_argument("--context", type=int, default=None,
                   help="average context of the traced decode steps (default: the trace's, else 64)")
    c.add_argument("--model", default=None, help="checkpoint directory (default: the one the trace names)")
    c.add_argument("--figures", default=None, metavar="JSON",
                   help="reuse this machine's measured figures from this file (measured and saved when absent)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=run_compare)


def run_validate(args) -> int:
    doc = json.loads(Path(args.trace).read_text())
    problems = validate_trace(doc)
    for p in problems[:20]:
        print(p)
    if problems:
        raise ValueError(f"{args.trace}: {len(problems)} problem(s) with the trace-event format")
    n = sum(1 for e in doc["traceEvents"] if e.get("ph") == "X")
    flows = sum(1 for e in doc["traceEvents"] if e.get("ph") == "s")
    print(f"{args.trace}: valid trace-event JSON, {n} slices, {flows} flow arrows")
    return 0


def run_plot(args) -> int:
    doc = load_trace(args.trace)
    step, rows = step_rows(doc, args.step)
    meta = doc.get("otherData", {})
    mine = [s for s in meta.get("steps", []) if s["step"] == step]
    tokens = sum(s["tokens"] for s in mine)
    m = mine[0]["micro_batches"] if mine else "?"
    plot_gantt(rows, args.out, f"{meta.get('topology', '')} step {step}: {tokens} tokens, {m} micro-batches (measured)")
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- measured side
def steady_steps(doc: dict) -> tuple[set[int], int]:
    """(steps, tokens): the steps with the most common token count (the decode steps of a steady
    batch; prefill and ramp-up steps left out) and that count."""
    tokens: dict[int, int] = defaultdict(int)
    for s in doc.get("otherData", {}).get("steps", []):
        tokens[s["step"]] += s.get("tokens", 0)
    counts = Counter(t for t in tokens.values() if t)
    if not counts:
        raise ValueError("the trace holds no step with tokens")
    batch = max(counts, key=lambda t: (counts[t], -t))
    return {st for st, t in tokens.items() if t == batch}, batch


def _spans(doc: dict) -> dict:
    """(step, stage, layer, micro-batch) -> [(track, start us, duration us)] of the steady steps."""
    busy = steady_steps(doc)[0]
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("ph") == "M" and e["name"] == "thread_name"}
    out: dict = defaultdict(list)
    for e in doc["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") not in (None, "step") and e["args"]["step"] in busy:
            a = e["args"]
            out[(a["step"], e["cat"], a["layer"], a["micro_batch"])].append((names[e["tid"]], e["ts"], e["dur"]))
    return out


def measured_stages(doc: dict, moe_layers: set[int]) -> dict[str, float]:
    """Medians (us) per layer and micro-batch, plus the step (ms):
    attention, ffn / dense_ffn  the busiest worker's span of each layer x micro-batch (the
                                simulator's stage times are the busiest GPU's)
    a2f                         A->F: the send's start to the FFN worker's receipt, where that
                                worker was already waiting (no queueing counted)
    transfers                   A->F + F->A: an attention worker's round trip (send start to the
                                partial sums received) less the last-replying FFN worker's compute,
                                where nobody queued. (F->A alone is not measurable from the stamps:
                                an FFN worker issues its reply inside its compute span, so the
                                reply can arrive before the span ends.)"""
    spans = _spans(doc)
    by: dict[str, list[float]] = defaultdict(list)
    for (step, stage, i, j), found in spans.items():
        if stage == ATTENTION:
            by["attention"].append(max(d for _, _, d in found))
        elif stage == FFN:
            by["ffn" if (i in moe_layers or found[0][0] == "colocated") else "dense_ffn"].append(max(d for _, _, d in found))
        elif stage == A2F:
            _transfers(spans, step, i, j, found, by)
    out = {k: statistics.median(v) for k, v in by.items() if v}
    busy = steady_steps(doc)[0]
    steps = [s["step_ms"] for s in doc.get("otherData", {}).get("steps", []) if s["step"] in busy and s["worker"] == 0]
    if steps:
        out["step_ms"] = statistics.median(steps)
    return out


def _transfers(spans: dict, step: int, i: int, j: int, sends: list, by: dict) -> None:
    waits = spans.get((step, A2F_WAIT, i, j), [])
    replies = {tr: (ts, d) for tr, ts, d in spans.get((step, F2A, i, j), [])}
    computes = {tr: d for tr, _, d in spans.get((step, FFN, i, j), [])}
    backs = {tr: (ts, d) for tr, ts, d in spans.get((step, F2A_WAIT, i, j), [])}
    for track, ts, _ in sends:
        by["a2f"] += [ts2 + d2 - ts for _, ts2, d2 in waits if ts2 <= ts]
        if track not in backs or not replies or any(ts2 > ts for _, ts2, _ in waits):
            continue
        last = max(replies, key=lambda tr: replies[tr][0])         # the FFN worker waited on
        b_ts, b_d = backs[track]
        # A was waiting before F computed, and F stamped its compute's end before the reply
        # arrived (else a descheduled FFN process inflates its compute span)
        if b_ts <= replies[last][0] - computes.get(last, 0.0) and b_ts + b_d >= replies[last][0]:
            by["transfers"].append(b_ts + b_d - ts - computes.get(last, 0.0))


def straggler(doc: dict) -> dict[str, float]:
    """Worker -> ms the other workers spent waiting for it: an attention worker's wait for F->A is
    charged to the FFN worker whose reply started last, an FFN worker's wait for A->F to the
    attention worker whose send ended last."""
    spans = _spans(doc)
    blame: dict[str, float] = defaultdict(float)
    for (step, stage, i, j), found in spans.items():
        if stage not in (F2A_WAIT, A2F_WAIT):
            continue
        senders = spans.get((step, F2A if stage == F2A_WAIT else A2F, i, j))
        if not senders:
            continue
        late = max(senders, key=(lambda s: s[1]) if stage == F2A_WAIT else (lambda s: s[1] + s[2]))
        blame[late[0]] += sum(d for _, _, d in found) / 1e3
    return dict(sorted(blame.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- predicted side
def _figures(path: str | None, threads: int, tokens: int):
    from afdserve.sim.local import CpuFigures, LayerOverheads, measure_cpu, measure_layer_overheads, measure_p2p
    if path and Path(path).exists():
        d = json.loads(Path(path).read_text())
        fig = d["cpu"]
        for k in ("gemm_seconds_per_weight", "ffn_gemm_seconds_per_weight"):
            fig[k] = tuple(tuple(p) for p in fig[k])
        return CpuFigures(**fig), LayerOverheads(**d["layers"])
    fig = measure_cpu(threads, quick=True)
    lat, bw = measure_p2p(quick=True)
    fig = dataclasses.replace(fig, p2p_latency_us=lat, p2p_bytes_per_s=bw)
    over = measure_layer_overheads(threads, max(1, tokens), quick=True)
    if path:
        Path(path).write_text(json.dumps({"cpu": dataclasses.asdict(fig), "layers": dataclasses.asdict(over)}))
    return fig, over


def predicted_stages(meta: dict, arch, batch: int, m: int, context: int, figures: str | None) -> dict[str, float]:
    """The simulator's stage times (us) and step (ms) for the traced deployment (m micro-batches)
    on this machine."""
    from afdserve.sim.local import cpu_efficiency
    from afdserve.sim.simulator import Deployment, SimPrecision, simulate, stage_times
    fig, over = _figures(figures, int(meta.get("threads", 1)), max(1, batch // m))
    hw = fig.hardware()
    size = 2.0 if meta.get("dtype") in ("bfloat16", "float16") else 4.0
    prec = SimPrecision(weight_bytes=size, kv_bytes=size, a2f_bytes=size, f2a_bytes=size, a2f_scales=False)
    eff = cpu_efficiency(fig, over)
    if meta.get("kind") == "colocated":
        dep = Deployment("colocated", hw, hw, ep=1, micro_batches=1)
    else:
        dep = Deployment("afd", hw, hw, int(meta["attention_workers"]), int(meta["ffn_workers"]), 1, micro_batches=m)
    st = stage_times(arch, dep, context, batch, prec, eff)
    r = simulate(arch, dep, context, batch, prec, eff)
    out = {"attention": st.attention * 1e6, "ffn": st.ffn * 1e6, "dense_ffn": st.dense_ffn * 1e6,
           "step_ms": r.tpot_ms}
    if dep.kind == "afd":
        out.update(a2f=st.a2f * 1e6, transfers=(st.a2f + st.f2a) * 1e6)
    return out


def run_compare(args) -> int:
    from afdserve.sim.local import small_arch
    doc = load_trace(args.trace)
    meta = doc.get("otherData", {})
    model = args.model or meta.get("model_dir")
    if not model:
        raise ValueError("the trace does not name its checkpoint: give --model DIR")
    arch = small_arch(model)
    busy, batch = steady_steps(doc)
    context = args.context or int(meta.get("context", 64))
    measured = measured_stages(doc, set(arch.moe_layer_ids))
    m = next(s["micro_batches"] for s in meta["steps"] if s["step"] in busy)
    # Fewer tokens than micro-batches leaves some micro-batches empty: the simulator models the
    # non-empty ones (at most one token each).
    m = min(m, batch)
    predicted = predicted_stages(meta, arch, batch, m, context, args.figures)
    rows = [(k, measured[k], predicted[k], (predicted[k] - measured[k]) / measured[k] * 100)
            for k in ("attention", "ffn", "dense_ffn", "a2f", "transfers", "step_ms") if k in measured and k in predicted]
    blame = straggler(doc)
    report = {"trace": args.trace, "topology": meta.get("topology"), "batch": batch, "context": context,
              "stages": [{"stage": k, "measured": a, "predicted": b, "error_pct": e} for k, a, b, e in rows],
              "waited_for_ms": blame, "straggler": next(iter(blame), None)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.trace}: {meta.get('topology')} batch {batch} context {context}, {len(busy)} decode steps "
          f"(medians per layer and micro-batch, us; step in ms)")
    print(f"{'stage':<12}{'measured':>12}{'predicted':>12}{'error':>9}")
    for k, a, b, e in rows:
        print(f"{k:<12}{a:>12.1f}{b:>12.1f}{e:>8.0f}%")
    if blame:
        print("waited for (ms others spent waiting on this worker): "
              + ", ".join(f"{w} {ms:.1f}" for w, ms in blame.items()))
        print(f"straggler: {report['straggler']}")
    return 0

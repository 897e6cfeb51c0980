"""The AFD pipeline on one clock: Chrome trace-event JSON, its validation, and Gantt charts.

`chrome_trace(steps)` turns the engine's ring of `StepTrace`s into the Trace Event Format that
Perfetto (ui.perfetto.dev) and chrome://tracing open: one process, one track (thread) per worker
("attention 0", "ffn 1", or "colocated"), a complete slice ("ph": "X") per step and per stage x
layer x micro-batch, and flow arrows ("ph": "s" -> "f") from every A->F send to the FFN worker's
receive and from every F->A send to the attention worker's wait. Times are microseconds on the
reference clock (attention worker 0's): every worker records on its own clock and
`afdserve.afd.trace.ClockAligner` estimates the offsets from the A<->F round trips; each
worker's offset and its uncertainty are in `otherData.clock_alignment`.

`validate_trace(doc)` checks what the viewers rely on; `step_rows(doc, n)` extracts one step per
track and `plot_gantt(rows, out)` draws it (the simulator's predicted step uses the same drawing,
`afdserve.sim.plots.plot_timeline`).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from afdserve.afd.trace import A2F, A2F_WAIT, ATTENTION, F2A, F2A_WAIT, FFN, STAGES, StepTrace

PID = 1
STAGE_COLOURS = {ATTENTION: "#4C72B0", A2F: "#DD8452", F2A_WAIT: "#C7C7C7", A2F_WAIT: "#E5E5E5",
                 FFN: "#55A868", F2A: "#8172B3", "head": "#937860"}
STAGE_LABELS = {ATTENTION: "attention", A2F: "A->F send", F2A_WAIT: "wait for F->A", A2F_WAIT: "wait for A->F",
                FFN: "FFN", F2A: "F->A send", "head": "LM head"}


def attention_track(w: int) -> str:
    return f"attention {w}"


def ffn_track(k: int) -> str:
    return f"ffn {k}"


def _tid(track: str) -> int:
    if track == "colocated":
        return 1
    role, idx = track.split()
    return (1 if role == "attention" else 1001) + int(idx)


def _track_spans(steps: list[StepTrace], clock: dict | None = None) -> dict[int, dict[str, list]]:
    """step -> track -> spans, moved onto the reference clock by `clock` (track -> (offset us, _))."""
    out: dict[int, dict[str, list]] = defaultdict(dict)
    clock = clock or {}

    def shifted(track: str, spans: list) -> list:
        off = clock.get(track, (0.0, 0.0))[0]
        return [[st, i, j, ts - off, d] for st, i, j, ts, d in spans] if off else spans
    for t in steps:
        own = "colocated" if t.colocated else attention_track(t.worker)
        out[t.step][own] = shifted(own, t.spans)
        for k, spans in enumerate(t.ffn_spans):
            out[t.step][ffn_track(k)] = shifted(ffn_track(k), spans)
    return out


def _slices(step: int, track: str, spans: list) -> list[dict]:
    tid = _tid(track)
    evs = [{"ph": "X", "name": f"{st} L{i} mb{j}", "cat": st, "pid": PID, "tid": tid, "ts": ts, "dur": max(dur, 0.0),
            "args": {"step": step, "layer": i, "micro_batch": j}} for st, i, j, ts, dur in spans]
    if spans:
        t0 = min(s[3] for s in spans)
        t1 = max(s[3] + s[4] for s in spans)
        evs.append({"ph": "X", "name": f"step {step}", "cat": "step", "pid": PID, "tid": tid, "ts": t0,
                    "dur": t1 - t0, "args": {"step": step}})
    return evs


def _flows(step: int, tracks: dict[str, list], next_id: list[int]) -> list[dict]:
    """Arrows A->F (attention's a2f -> each FFN worker's a2f_wait) and F->A (ffn's f2a -> each
    attention worker's f2a_wait) of one step."""
    index = {tr: {(s[0], s[1], s[2]): s for s in spans} for tr, spans in tracks.items()}
    attn = [tr for tr in tracks if tr.startswith("attention")]
    ffn = [tr for tr in tracks if tr.startswith("ffn")]
    evs = []
    for name, senders, send_stage, receivers, recv_stage in (("A->F", attn, A2F, ffn, A2F_WAIT),
                                                              ("F->A", ffn, F2A, attn, F2A_WAIT)):
        for s_tr in senders:
            for key, s in index[s_tr].items():
                if key[0] != send_stage:
                    continue
                for r_tr in receivers:
                    r = index[r_tr].get((recv_stage, key[1], key[2]))
                    if r is None:
                        continue
                    fid = next_id[0]
                    next_id[0] += 1
                    common = {"name": name, "cat": "transfer", "id": fid, "pid": PID}
                    # from the send's start to the receive's end, each just inside its slice
                    evs.append({**common, "ph": "s", "tid": _tid(s_tr), "ts": s[3] + min(s[4] / 2, 1.0)})
                    evs.append({**common, "ph": "f", "bp": "e", "tid": _tid(r_tr),
                                "ts": r[3] + r[4] - min(r[4] / 2, 1.0),
                                "args": {"step": step, "layer": key[1], "micro_batch": key[2]}})
    return evs


def chrome_trace(steps: list[StepTrace], clock: dict | None = None, meta: dict | None = None,
                 cache: dict | None = None) -> dict:
    """Chrome trace-event JSON object of the given steps (see the module docstring). `cache`
    (step -> events, for one `clock`) keeps each step's events from being built again."""
    by_step = _track_spans(steps, clock)
    cache = {} if cache is None else cache
    events, tracks = [], set()
    for step, tr in sorted(by_step.items()):
        tracks.update(tr)
        if step not in cache:
            evs = [e for track, spans in tr.items() for e in _slices(step, track, spans)]
            evs += _flows(step, tr, [max(step, 0) * FLOW_IDS_PER_STEP + 1])
            # per track: time order; an enclosing step slice before the slices it contains
            evs.sort(key=_order)
            cache[step] = evs
        events += cache[step]
    events.sort(key=_order)                  # steps follow each other on every track: nearly sorted
    header = [{"ph": "M", "name": "process_name", "pid": PID, "tid": 0,
               "args": {"name": f"afdserve {(meta or {}).get('topology', '')}".strip()}}]
    for track in sorted(tracks, key=_tid):
        header.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": _tid(track), "args": {"name": track}})
        header.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": _tid(track),
                       "args": {"sort_index": _tid(track)}})
    summaries = [{"step": t.step, "worker": t.worker, "tokens": t.num_tokens, "micro_batches": t.micro_batches,
                  "step_ms": t.step_ms} for t in steps]
    return {"traceEvents": header + events, "displayTimeUnit": "ms",
            "otherData": {"generator": "afdserve", **(meta or {}), "clock_alignment": _clock_table(clock or {}),
                          "steps": summaries}}


FLOW_IDS_PER_STEP = 1_000_000


def _order(e: dict) -> tuple:
    return (e["tid"], e["ts"], -e.get("dur", 0.0), e["ph"] != "X")


def _clock_table(clock: dict) -> dict:
    return {name: {"offset_us": off, "uncertainty_us": unc} for name, (off, unc) in sorted(clock.items())}


# ----------------------------------------------------------------------------- validation
_REQUIRED = {"X": ("name", "ph", "ts", "dur", "pid", "tid"), "B": ("name", "ph", "ts", "pid", "tid"),
             "E": ("ph", "ts", "pid", "tid"), "i": ("name", "ph", "ts", "pid"), "I": ("name", "ph", "ts", "pid"),
             "C": ("name", "ph", "ts", "pid", "args"), "M": ("name", "ph", "pid", "args"),
             "s": ("name", "cat", "ph", "id", "ts", "pid", "tid"), "t": ("name", "cat", "ph", "id", "ts", "pid", "tid"),
             "f": ("name", "cat", "ph", "id", "ts", "pid", "tid")}


def validate_trace(doc) -> list[str]:
    """Problems with a Chrome trace-event document (empty when it is valid): the JSON object form
    with a traceEvents list; per event its phase's required keys and types; on every track complete
    slices in time order and properly nested; every flow id with exactly one start and one finish."""
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["not a trace-event object: needs a 'traceEvents' list"]
    errors: list[str] = []
    last_ts: dict = {}
    open_ends: dict = defaultdict(list)
    flows: dict = defaultdict(lambda: {"s": 0, "f": 0})
    for n, e in enumerate(doc["traceEvents"]):
        ph = e.get("ph") if isinstance(e, dict) else None
        if ph not in _REQUIRED:
            errors.append(f"event {n}: unknown or missing ph {ph!r}")
            continue
        missing = [k for k in _REQUIRED[ph] if k not in e]
        if missing:
            errors.append(f"event {n} ({ph}): missing {', '.join(missing)}")
            continue
        if ph == "M":
            continue
        if not isinstance(e["ts"], (int, float)) or (ph == "X" and (not isinstance(e["dur"], (int, float))
                                                                   or e["dur"] < 0)):
            errors.append(f"event {n} ({ph}): ts/dur must be numbers, dur >= 0")
            continue
        if ph in ("s", "f"):
            flows[(e["cat"], e["id"])][ph] += 1
        if ph in ("s", "t", "f"):
            continue
        if ph == "X":
            errors += _check_slice(n, e, last_ts, open_ends)
    for (cat, fid), c in flows.items():
        if c["s"] != 1 or c["f"] != 1:
            errors.append(f"flow {cat}/{fid}: {c['s']} start(s) and {c['f']} finish(es), need one of each")
    return errors


def _check_slice(n: int, e: dict, last_ts: dict, open_ends: dict) -> list[str]:
    track = (e["pid"], e["tid"])
    if e["ts"] < last_ts.get(track, float("-inf")):
        return [f"event {n}: ts {e['ts']} goes back in time on track {track}"]
    last_ts[track] = e["ts"]
    stack = open_ends[track]
    # 1 ns of slack both ways: timestamps are float microseconds of a monotonic clock, whose last
    # bit is already ~2e-6 us once the machine has been up for 2.4 hours (2^33 us), so a slice
    # that starts where the previous one ended can land a rounding step before that end
    while stack and stack[-1] <= e["ts"] + 1e-3:
        stack.pop()
    end = e["ts"] + e["dur"]
    if stack and end > stack[-1] + 1e-3:
        return [f"event {n}: slice {e['name']!r} overlaps its enclosing slice on track {track}"]
    stack.append(end)
    return []


def load_trace(path: str | Path) -> dict:
    """A trace file written by --afd-trace-file (Chrome JSON); clear errors for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trace file {p} does not exist")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        hint = " (a .jsonl trace holds per-step JSON lines; name the file .json for a timeline)" \
            if p.suffix == ".jsonl" else ""
        raise ValueError(f"{p} is not a Chrome trace-event JSON file: {exc}{hint}") from None
    problems = validate_trace(doc)
    if problems:
        raise ValueError(f"{p} is not a valid trace: {problems[0]}")
    return doc


# ----------------------------------------------------------------------------- one step as rows
def trace_steps(doc: dict) -> list[int]:
    return sorted({e["args"]["step"] for e in doc["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "step"})


def step_rows(doc: dict, step: int | None = None) -> tuple[int, dict[str, list[tuple]]]:
    """(step, {track: [(stage, layer, micro-batch, start ms, duration ms)]}) of one step (default:
    the last one with tokens), times relative to the step's start (`_relative`)."""
    steps = trace_steps(doc)
    if not steps:
        raise ValueError("the trace holds no steps")
    if step is None:
        busy = [s["step"] for s in doc.get("otherData", {}).get("steps", []) if s.get("tokens")]
        step = max(busy) if busy else steps[-1]
    if step not in steps:
        raise ValueError(f"step {step} is not in the trace (it holds steps {steps[0]}..{steps[-1]})")
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e.get("ph") == "M" and e["name"] == "thread_name"}
    rows: dict[str, list] = defaultdict(list)
    for e in doc["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") in STAGES and e["args"].get("step") == step:
            a = e["args"]
            rows[names.get(e["tid"], str(e["tid"]))].append((e["cat"], a["layer"], a["micro_batch"], e["ts"], e["dur"]))
    return step, _relative(rows)


def _relative(tracks: dict[str, list]) -> dict[str, list[tuple]]:
    """Spans in ms from the step's first span that is not an FFN worker's wait for input (which
    starts when the previous step ended: idle time between steps, clipped off)."""
    starts = [s[3] for spans in tracks.values() for s in spans if s[0] != A2F_WAIT]
    t0 = min(starts or [s[3] for spans in tracks.values() for s in spans])
    out = {}
    for tr, spans in sorted(tracks.items(), key=lambda kv: _sort_key(kv[0])):
        rows = []
        for st, i, j, ts, d in sorted(spans, key=lambda s: s[3]):
            if ts < t0:
                d, ts = max(0.0, ts + d - t0), t0
            rows.append((st, i, j, (ts - t0) / 1e3, d / 1e3))
        out[tr] = rows
    return out


def latest_step_rows(steps: list[StepTrace], clock: dict | None = None) -> tuple[int, dict[str, list[tuple]]] | None:
    """`step_rows` straight from the engine's ring: the last step with tokens, or None."""
    busy = [t.step for t in steps if t.num_tokens > 0]
    if not busy:
        return None
    last = max(busy)
    tracks = _track_spans([t for t in steps if t.step == last], clock).get(last, {})
    if not any(tracks.values()):
        return None
    return last, _relative(tracks)


def _sort_key(track: str) -> tuple:
    role, _, idx = track.partition(" ")
    return (role != "attention", role, int(idx) if idx.isdigit() else 0)


def plot_gantt(rows: dict[str, list[tuple]], out: str | Path, title: str = "") -> Path:
    """One step as a Gantt chart: a row per worker (or resource), a colour per stage, the
    micro-batch index written on every bar wide enough to hold it. rows: see `step_rows`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    names = list(rows)
    end = max((s[3] + s[4] for spans in rows.values() for s in spans), default=1.0)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.7 * len(names)))
    used = []
    for y, name in enumerate(names):
        for st, i, j, t0, d in rows[name]:
            ax.broken_barh([(t0, d)], (y - 0.38, 0.76), facecolors=STAGE_COLOURS.get(st, "#999999"),
                           edgecolor="white", linewidth=0.3)
            if st not in used:
                used.append(st)
            if d > end / 60:
                ax.text(t0 + d / 2, y, str(j), ha="center", va="center", fontsize=7,
                        color="white" if st in (ATTENTION, FFN, F2A) else "black")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel("ms since the step's first span (numbers on bars: micro-batch)")
    ax.legend(handles=[Patch(color=STAGE_COLOURS.get(s, "#999999"), label=STAGE_LABELS.get(s, s)) for s in used],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(names) < 4 else -0.15), ncol=len(used),
              fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

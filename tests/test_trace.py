"""The pipeline trace: recorder, clock alignment, Chrome trace-event output and its validation,
Gantt charts, the simulator's schedule and `afdserve trace` (synthetic pipelines, no processes),
then real 1A1F / 2A2F / colocated runs of the tiny preset writing traces."""
from __future__ import annotations

import copy
import json
import time

import pytest

from afdserve.afd.timeline import chrome_trace, latest_step_rows, load_trace, plot_gantt, step_rows, validate_trace
from afdserve.afd.trace import (A2F, A2F_WAIT, ATTENTION, F2A, F2A_WAIT, FFN, ClockAligner, SpanRecorder, StepTrace,
                                TraceLog, ffn_stamps_len, pack_ffn_stamps, unpack_ffn_stamps)


# ---------------------------------------------------------------------- a synthetic pipeline
def synthetic_step(x: int, y: int, L: int, m: int, *, attn=100.0, ffn=(80.0,), link=10.0, send=5.0,
                   clock=None, step=0, start=1e6) -> list[StepTrace]:
    """One step of an x-attention, y-FFN pipeline scheduled in the runtime's order, recorded on each
    worker's own clock (`clock`: track -> offset us added to the reference time)."""
    clock = clock or {}
    ffn = tuple(ffn) * y if len(ffn) == 1 else tuple(ffn)
    a_free = [start] * x
    f_free = [start] * y
    a_spans = [[] for _ in range(x)]
    f_spans = [[] for _ in range(y)]
    reply_at = {}                                   # (w, i, j) -> arrival of all partial sums
    for i in range(L):
        sent = {}
        for j in range(m):
            for w in range(x):
                t = a_free[w]
                if i:                                   # collect(i-1, j)
                    done = max(t, reply_at[(w, i - 1, j)])
                    a_spans[w].append([F2A_WAIT, i - 1, j, t, done - t])
                    t = done
                a_spans[w] += [[ATTENTION, i, j, t, attn], [A2F, i, j, t + attn, send]]
                sent[(w, j)] = t + attn + send
                a_free[w] = t + attn + send
            for k in range(y):
                arrive = max(sent[(w, j)] for w in range(x)) + link
                t0 = f_free[k]
                t1 = max(t0, arrive)
                f_spans[k] += [[A2F_WAIT, i, j, t0, t1 - t0], [FFN, i, j, t1, ffn[k]], [F2A, i, j, t1 + ffn[k], send]]
                f_free[k] = t1 + ffn[k] + send
            for w in range(x):
                reply_at[(w, i, j)] = max(f_free[k] for k in range(y)) + link
    for j in range(m):
        for w in range(x):
            t = a_free[w]
            done = max(t, reply_at[(w, L - 1, j)])
            a_spans[w].append([F2A_WAIT, L - 1, j, t, done - t])
            a_free[w] = done

    def local(track, spans):
        off = clock.get(track, 0.0)
        return [[s[0], s[1], s[2], s[3] + off, s[4]] for s in spans]
    out = []
    for w in range(x):
        t = StepTrace(w, 4 * m, m, step_ms=(a_free[w] - start) / 1e3, spans=local(f"attention {w}", a_spans[w]))
        if w == 0:
            t.ffn_spans = [local(f"ffn {k}", f_spans[k]) for k in range(y)]
        t.step = step
        out.append(t)
    return out


def test_span_recorder_gives_microseconds_per_step():
    rec = SpanRecorder()
    rec.add(ATTENTION, 0, 1, 1.0, 1.5)
    rec.add(FFN, 2, 0, 1.5, 1.75)
    assert rec.take() == [[ATTENTION, 0, 1, 1e6, 0.5e6], [FFN, 2, 0, 1.5e6, 0.25e6]]
    assert rec.take() == []


def test_ffn_stamps_travel_bit_exactly_as_float32():
    import torch
    L, m = 3, 2
    base = time.perf_counter()
    times = [[(base + i + j * 1e-3, base + i + j * 1e-3 + 2e-5, base + i + 0.5, base + i + 0.5 + 7e-6)
              for j in range(m)] for i in range(L)]
    buf = pack_ffn_stamps(times)
    assert buf.dtype == torch.float32 and buf.numel() == ffn_stamps_len(L, m)
    ffn_ms, recv_ms, spans = unpack_ffn_stamps(buf.clone(), L, m)
    assert ffn_ms[2][1] == pytest.approx((times[2][1][2] - times[2][1][1]) * 1e3, abs=1e-6)
    assert recv_ms[1][0] == pytest.approx((2e-5 + 7e-6) * 1e3, abs=1e-6)
    assert len(spans) == 3 * L * m and {s[0] for s in spans} == {A2F_WAIT, FFN, F2A}
    a2f_wait = next(s for s in spans if s[0] == A2F_WAIT and s[1] == 2 and s[2] == 1)
    assert a2f_wait[3] == pytest.approx(times[2][1][0] * 1e6, abs=1e-3)     # ns precision kept


@pytest.mark.parametrize("x,y", [(1, 1), (2, 2), (2, 1)])
def test_clock_alignment_recovers_offsets_within_its_uncertainty(x, y):
    clock = {"ffn 0": 5_000.0, "ffn 1": -12_345.0, "attention 1": 777.0}
    steps = synthetic_step(x, y, 4, 3, clock=clock)
    for spans in steps[0].ffn_spans:        # a descheduled FFN stamps its reply after it arrived
        for s in spans:
            if s[0] == F2A and s[1] == 1:
                s[3] += 3_000.0
    al = ClockAligner()
    al.observe(steps)
    table = al.table()
    assert set(table) == {f"attention {w}" for w in range(x)} | {f"ffn {k}" for k in range(y)}
    for track, (off, unc) in table.items():
        true = clock.get(track, 0.0)
        assert abs(off - true) <= unc + 1e-6, (track, off, true, unc)
        # half the shortest round trip (send, link, FFN, send, link); chained: two halves
        assert unc <= (2 * (10.0 + 5.0) + 80.0) * (1 if track != "attention 1" else 2) / 2 + 1e-6
    assert table["attention 0"] == (0.0, 0.0)


def _events(doc, ph):
    return [e for e in doc["traceEvents"] if e["ph"] == ph]


def test_chrome_trace_is_valid_with_one_track_per_worker_and_paired_flows():
    clock = {"ffn 0": 5_000.0, "ffn 1": -3_000.0, "attention 1": 400.0}
    steps = synthetic_step(2, 2, 3, 3, clock=clock, step=0) + synthetic_step(2, 2, 3, 3, clock=clock, step=1, start=2e6)
    log = TraceLog()
    for s in (steps[:2], steps[2:]):
        log.add(s)
    doc = chrome_trace(list(log.steps), clock=log.aligner.table(), meta={"topology": "2A2F"})
    assert validate_trace(doc) == []
    json.loads(json.dumps(doc))
    names = {e["args"]["name"] for e in _events(doc, "M") if e["name"] == "thread_name"}
    assert names == {"attention 0", "attention 1", "ffn 0", "ffn 1"}
    slices = [e for e in _events(doc, "X") if e["cat"] != "step"]
    assert len(slices) == 2 * (2 * 3 * 3 * 3) + 2 * (2 * 3 * 3 * 3)      # 2 steps x 4 workers x L*m*3
    # flows: A->F from each attention worker to each FFN worker, F->A back, per layer x micro-batch
    assert len(_events(doc, "s")) == len(_events(doc, "f")) == 2 * 2 * (2 * 2 * 3 * 3)
    # on the reference clock, every transfer arrives after it was sent
    by_id = {}
    for e in _events(doc, "s") + _events(doc, "f"):
        by_id.setdefault(e["id"], {})[e["ph"]] = e
    unc = max(u for _, u in log.aligner.table().values())
    late = [i for i, p in by_id.items() if p["f"]["ts"] + 2 * unc < p["s"]["ts"]]
    assert not late
    assert set(doc["otherData"]["clock_alignment"]) == names


def test_validator_rejects_what_viewers_cannot_read():
    steps = synthetic_step(1, 1, 2, 2)
    good = chrome_trace(steps)
    assert validate_trace(good) == []
    assert validate_trace([1, 2]) and validate_trace({"events": []})
    bad = copy.deepcopy(good)
    x = next(e for e in bad["traceEvents"] if e["ph"] == "X")
    del x["dur"]
    assert any("missing dur" in p for p in validate_trace(bad))
    bad = copy.deepcopy(good)
    bad["traceEvents"].append({"ph": "Q", "name": "?", "ts": 0, "pid": 1, "tid": 1})
    assert any("unknown" in p for p in validate_trace(bad))
    bad = copy.deepcopy(good)
    xs = [e for e in bad["traceEvents"] if e["ph"] == "X" and e["tid"] == 1]
    xs[-1]["ts"] = xs[0]["ts"] - 100.0                       # back in time on its track
    assert any("back in time" in p for p in validate_trace(bad))
    bad = copy.deepcopy(good)
    bad["traceEvents"].remove(next(e for e in bad["traceEvents"] if e["ph"] == "f"))
    assert any("start(s)" in p for p in validate_trace(bad))
    bad = copy.deepcopy(good)
    xs = [e for e in bad["traceEvents"] if e["ph"] == "X" and e["tid"] == 1 and e["cat"] != "step"]
    xs[0]["dur"] = xs[1]["ts"] - xs[0]["ts"] + 50.0          # overlaps the next slice
    assert any("overlaps" in p for p in validate_trace(bad))
    # A machine up for hours: microsecond timestamps near 1.1e10, where a slice that starts where
    # the previous one ended can land a float rounding step (~2e-6 us) before that end.
    late = {"traceEvents": [{"ph": "X", "name": n, "cat": n, "pid": 1, "tid": 1, "ts": ts, "dur": dur}
                            for n, ts, dur in (("attention", 1.1e10, 123.4567),
                                               ("a2f", 1.1e10 + 123.4567 - 2e-6, 5.0))]}
    assert validate_trace(late) == []


def test_trace_log_ring_writes_bounded_chrome_json_and_jsonl(tmp_path):
    path = tmp_path / "t.json"
    log = TraceLog(keep=3, path=str(path), flush_s=0.0)
    for n in range(5):
        log.add(synthetic_step(1, 1, 2, 2, step=n, start=1e6 * (n + 1)))
    log.close()
    doc = load_trace(path)
    steps = {e["args"]["step"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert steps == {2, 3, 4}                                 # the ring keeps the last 3
    bg = tmp_path / "bg.json"                                 # the background writer
    log = TraceLog(keep=4, path=str(bg), flush_s=0.05)
    log.add(synthetic_step(1, 1, 2, 2))
    deadline = time.monotonic() + 10
    while not bg.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert validate_trace(json.loads(bg.read_text())) == []
    log.add(synthetic_step(1, 1, 2, 2, start=2e6))
    log.close()
    assert not log._writer.is_alive() and len(trace_steps_of(bg)) == 2
    jl = tmp_path / "t.jsonl"
    log = TraceLog(keep=2, path=str(jl))
    for n in range(3):
        log.add(synthetic_step(1, 1, 2, 2))
    lines = jl.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["spans"]
    with pytest.raises(ValueError, match="not a Chrome trace-event JSON"):
        load_trace(jl)


def trace_steps_of(path) -> list[int]:
    from afdserve.afd.timeline import trace_steps
    return trace_steps(load_trace(path))


def test_step_rows_and_gantt_png(tmp_path):
    doc = chrome_trace(synthetic_step(2, 1, 2, 3, step=7))
    step, rows = step_rows(doc)
    assert step == 7 and list(rows) == ["attention 0", "attention 1", "ffn 0"]
    assert min(s[3] for r in rows.values() for s in r) == 0.0
    with pytest.raises(ValueError, match="step 3 is not in the trace"):
        step_rows(doc, 3)
    live = latest_step_rows(synthetic_step(2, 1, 2, 3, step=7))
    assert live[0] == 7 and live[1].keys() == rows.keys()
    out = plot_gantt(rows, tmp_path / "g.png", "test")
    assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"


def test_straggler_and_measured_stages():
    from afdserve.trace_cli import measured_stages, straggler
    doc = chrome_trace(synthetic_step(2, 2, 3, 3, ffn=(50.0, 400.0)), meta={"topology": "2A2F"})
    doc["otherData"]["steps"][0]["tokens"] = 12
    blame = straggler(doc)
    assert next(iter(blame)) == "ffn 1" and blame["ffn 1"] > 5 * blame.get("ffn 0", 0.0)
    st = measured_stages(doc, moe_layers={1, 2})
    assert st["attention"] == pytest.approx(100.0)
    assert st["dense_ffn"] == 400.0 and st["a2f"] == pytest.approx(5.0 + 10.0)   # send + link
    one = chrome_trace(synthetic_step(1, 1, 3, 1))               # one micro-batch: A waits for every reply
    one["otherData"]["steps"][0]["tokens"] = 4
    assert measured_stages(one, {1})["transfers"] == pytest.approx(2 * (5.0 + 10.0))   # both ways


# ---------------------------------------------------------------------- the simulator's schedule
def test_simulated_schedule_is_the_step_simulate_times():
    from afdserve.cost.arch import get_model
    from afdserve.cost.hardware import get_hardware
    from afdserve.sim.plots import timeline_rows
    from afdserve.sim.simulator import Deployment, schedule, simulate
    h800 = get_hardware("H800")
    arch = get_model("step3")
    dep = Deployment("afd", h800, h800, 2, 2, 8, micro_batches=3)
    sched = schedule(arch, dep, 4096, 6144)
    r = simulate(arch, dep, 4096, 6144)
    assert len(sched) == arch.num_layers * 4 * 3 + 3
    # one resource never runs two stages at once
    by_res = {}
    for s in sched:
        by_res.setdefault(s.resource, []).append(s)
    for items in by_res.values():
        items.sort(key=lambda s: s.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(items, items[1:]))
    span_ms = (max(s.end for s in sched) - min(s.start for s in sched)) * 1e3
    assert span_ms >= r.tpot_ms * 0.99                          # steady state: period <= one step's span
    rows = timeline_rows(sched)
    assert list(rows) == ["attention GPU", "A->F link", "FFN GPU", "F->A link"]


def test_simulate_timeline_cli(tmp_path):
    from afdserve.cli import main
    out = tmp_path / "sim.png"
    assert main(["simulate", "--model", "step3", "--afd", "1A1F", "--hardware", "H800", "--batch", "768",
                 "--timeline", str(out), "--json"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- real runs (tiny preset)
FIGURES = {"cpu": {"threads": 1, "read_bytes_per_s": 1e10, "matmul_flops": 5e10, "op_us": 2.0,
                   "gemm_seconds_per_weight": [[1, 2e-10], [8, 6e-10], [64, 3e-9]], "p2p_latency_us": 40.0,
                   "p2p_bytes_per_s": 2e9, "ffn_gemm_seconds_per_weight": [[1, 2e-10], [8, 6e-10], [64, 3e-9]]},
           "layers": {"attention_us": 150.0, "ffn_us": 120.0}}


@pytest.mark.slow
@pytest.mark.parametrize("topo, prompts, m", [("1A1F", 4, 2), ("2A2F", 4, 2), (None, 4, 2),
                                              ("1A1F", 1, 3)])     # fewer tokens than micro-batches
def test_traced_run_validates_plots_and_compares(tiny_ckpt, tmp_path, topo, prompts, m, capsys):
    from afdserve import LLM, SamplingParams
    from afdserve.cli import main
    path = tmp_path / "trace.json"
    with LLM(model=str(tiny_ckpt), afd=topo, micro_batches=m, afd_trace_file=str(path)) as llm:
        llm.generate([[5 + i, 6, 7, 8] for i in range(prompts)],
                     SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    doc = load_trace(path)                       # validates
    meta = doc["otherData"]
    tracks = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    if topo is None:
        assert tracks == {"colocated"} and not [e for e in doc["traceEvents"] if e["ph"] == "s"]
        assert {e["cat"] for e in doc["traceEvents"] if e["ph"] == "X"} == {"step", ATTENTION, FFN}
    else:
        x, y = int(topo[0]), int(topo[2])
        assert tracks == {f"attention {w}" for w in range(x)} | {f"ffn {k}" for k in range(y)}
        cats = {e["cat"] for e in doc["traceEvents"] if e["ph"] == "X"}
        assert cats == {"step", ATTENTION, A2F, F2A_WAIT, A2F_WAIT, FFN, F2A}
        assert sum(e["ph"] == "s" for e in doc["traceEvents"]) > 0
        # one host, one monotonic clock: the offsets estimated from the round trips contain 0
        for track, (off, unc) in meta["clock_estimate"].items():
            assert abs(off) <= unc + 1.0, (track, off, unc)
        assert meta["topology"] == topo and meta["shared_clock"] is True
    out = tmp_path / "step.png"
    assert main(["trace", "plot", str(path), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps(FIGURES))
    capsys.readouterr()
    assert main(["trace", "compare", str(path), "--context", "8", "--figures", str(figures), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stages = {r["stage"]: r for r in report["stages"]}
    # "transfers" (the round trip net of the FFN's compute) is only measured in layers where the
    # attention worker was already waiting when the FFN began computing; with a fast FFN and
    # several micro-batches in flight a short run can have none, so it is checked when present
    want = {"attention", "ffn", "step_ms"} | ({"a2f"} if topo else set())
    assert want <= set(stages) and set(stages) <= want | {"transfers", "dense_ffn"}
    for r in stages.values():
        assert r["measured"] > 0 and r["predicted"] > 0
        assert r["error_pct"] == pytest.approx((r["predicted"] - r["measured"]) / r["measured"] * 100)
    if topo:
        assert report["straggler"] in tracks

"""`/dashboard`: a live page of the server (one self-contained HTML file, no network beyond this server).

`install(app, async_engine, metrics)` adds two routes:
    GET /dashboard        static/dashboard.html (inline CSS and JS; polls the route below every second)
    GET /dashboard/data   JSON: engine gauges and counters (the numbers /metrics exports), TTFT and
                          TPOT percentiles over the last requests, a history of throughput, queue
                          and KV usage (one sample per poll, at most every 0.5 s, last 600), and
                          with a traced executor (AFD, or any run with --afd-trace-file) the latest
                          busy step's pipeline timeline and per-worker stage times.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from afdserve.afd.timeline import latest_step_rows

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


class Dashboard:
    """Request latencies (chained after the metrics' on_output) and a history sampled on each poll."""

    def __init__(self, async_engine, keep_requests: int = 1000, keep_samples: int = 600):
        self.engine = async_engine
        self.ttft: deque[float] = deque(maxlen=keep_requests)
        self.tpot: deque[float] = deque(maxlen=keep_requests)
        self.history: deque[dict] = deque(maxlen=keep_samples)
        self.finished = 0
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._started = time.time()
        inner = async_engine.on_output

        def on_output(out):
            if inner is not None:
                inner(out)
            self.observe(out)
        async_engine.on_output = on_output

    def observe(self, out) -> None:
        m = out.metrics
        with self._lock:
            if out.request_id not in self._seen and m.first_token_time is not None:
                self._seen.add(out.request_id)
                self.ttft.append((m.first_token_time - m.arrival_time) * 1e3)
            if out.finished:
                self._seen.discard(out.request_id)
                self.finished += 1
                longest = max((len(c.token_ids) for c in out.outputs), default=0)
                if longest > 1 and m.finish_time is not None and m.first_token_time is not None:
                    self.tpot.append((m.finish_time - m.first_token_time) / (longest - 1) * 1e3)

    def data(self) -> dict:
        stats = self.engine.stats()
        now = time.time()
        engine = None
        if stats is not None:
            engine = {k: getattr(stats, k) for k in ("num_running", "num_waiting", "num_kv_blocks",
                                                       "num_free_kv_blocks", "kv_usage", "prompt_tokens_total",
                                                       "generation_tokens_total")}
            self._sample(now, engine)
        with self._lock:
            latency = {name: {"count": len(vals), **{f"p{q}": percentile(list(vals), q) for q in PERCENTILES}}
                       for name, vals in (("ttft_ms", self.ttft), ("tpot_ms", self.tpot))}
            finished = self.finished
        return {"time": now, "uptime_s": now - self._started, "health": self.engine.health(), "engine": engine,
                "requests_finished": finished, "latency": latency, "history": list(self.history),
                "afd": self.engine.afd_trace_summary(), "pipeline": self._pipeline()}

    def _sample(self, now: float, engine: dict) -> None:
        with self._lock:
            last = self.history[-1] if self.history else None
            if last is not None and now - last["t"] < 0.5:
                return
            tps = 0.0
            if last is not None:
                tps = max(0.0, engine["generation_tokens_total"] - last["tokens"]) / (now - last["t"])
            self.history.append({"t": now, "tokens": engine["generation_tokens_total"], "tokens_per_s": tps,
                                 "running": engine["num_running"], "waiting": engine["num_waiting"],
                                 "kv_usage": engine["kv_usage"]})

    def _pipeline(self) -> dict | None:
        traces = self.engine.engine.executor.traces
        if traces is None:
            return None
        found = latest_step_rows(list(traces.steps), traces.clock())
        if found is None:
            return None
        step, rows = found
        totals = {track: _stage_totals(spans) for track, spans in rows.items()}
        return {"step": step, "rows": {t: [list(s) for s in spans] for t, spans in rows.items()},
                "stage_ms": totals}


def _stage_totals(spans: list[tuple]) -> dict[str, float]:
    out: dict[str, float] = {}
    for stage, _, _, _, dur in spans:
        out[stage] = out.get(stage, 0.0) + dur
    return out


def page() -> str:
    return files("afdserve.server").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def install(app: FastAPI, async_engine, metrics=None) -> Dashboard:
    """Add /dashboard and /dashboard/data to `app` (call after the metrics hooks are set)."""
    board = Dashboard(async_engine)
    html = page()

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard():
        return HTMLResponse(html)

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data():
        return board.data()
    return board

"""Prometheus metrics of the server, in a registry of its own (several apps can share a process).

Latency histograms are observed in the engine's step thread from each request's timestamps;
gauges are read from the step thread's last stats snapshot when /metrics is scraped.
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from afdserve.engine.engine import EngineStats, RequestOutput

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("afdserve_time_to_first_token_seconds", "Arrival to first generated token",
                              labels, registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("afdserve_inter_token_latency_seconds", "Time between consecutive outputs "
                             "of a request (per token)", labels, registry=r, buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("afdserve_time_per_output_token_seconds", "(finish - first token) / "
                              "(tokens - 1) of a finished request", labels, registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("afdserve_e2e_request_latency_seconds", "Arrival to finish", labels,
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.waiting = Gauge("afdserve_num_requests_waiting", "Sequences waiting for KV blocks", labels, registry=r)
        self.running = Gauge("afdserve_num_requests_running", "Sequences running", labels, registry=r)
        self.kv_usage = Gauge("afdserve_kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)",
                              labels, registry=r)
        self.kv_free = Gauge("afdserve_kv_free_blocks", "Free KV blocks", labels, registry=r)
        self.afd_pipeline = Gauge("afdserve_afd_pipeline", "AFD pipeline per-step means over recent steps: "
                                  "*_ms stages, bubble and hidden fractions", labels + ["quantity"], registry=r)
        self.kv_total = Gauge("afdserve_kv_total_blocks", "KV blocks in all", labels, registry=r)
        self.decode_graphs = Gauge("afdserve_decode_graphs", "Batch sizes whose decode steps replay a recorded "
                                   "graph (docs/graphs.md)", labels, registry=r)
        self.graph_replays = Counter("afdserve_decode_graph_replays", "Decode steps replayed from a recorded graph",
                                     labels, registry=r)
        self.prompt_tokens = Counter("afdserve_prompt_tokens", "Prompt tokens accepted", labels, registry=r)
        self.generation_tokens = Counter("afdserve_generation_tokens", "Tokens generated", labels, registry=r)
        self.requests = Counter("afdserve_request_success", "Finished completions by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.http_errors = Counter("afdserve_request_errors", "Requests answered with an error, by status",
                                   labels + ["status"], registry=r)
        self.afd_restarts = Counter("afdserve_afd_worker_restarts", "AFD workers started again or rejoined after "
                                    "a loss, by role and reason (exited, stopped, stalled, failed start)",
                                    labels + ["role", "reason"], registry=r)
        self.afd_replays = Counter("afdserve_afd_step_replays", "AFD steps run again after the process group "
                                   "was re-formed", labels, registry=r)
        self._recovery_seen: dict = {}
        self._last_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._totals = (0, 0)
        self._replays_seen = 0

    # --------------------------------------------------------- step-thread hooks
    def on_output(self, out: RequestOutput) -> None:
        now, m, name = time.monotonic(), out.metrics, self.model_name
        with self._lock:
            last = self._last_seen.get(out.request_id)
            if last is None and m.first_token_time is not None:
                self.ttft.labels(name).observe(m.first_token_time - m.arrival_time)
            elif last is not None:
                self.itl.labels(name).observe(now - last)
            self._last_seen[out.request_id] = now
            if out.finished:
                self._last_seen.pop(out.request_id, None)
        if not out.finished:
            return
        if m.finish_time is not None:
            self.e2e.labels(name).observe(m.finish_time - m.arrival_time)
            longest = max((len(c.token_ids) for c in out.outputs), default=0)
            if longest > 1 and m.first_token_time is not None:
                self.tpot.labels(name).observe((m.finish_time - m.first_token_time) / (longest - 1))
        for c in out.outputs:
            self.requests.labels(name, "error" if out.error else (c.finish_reason or "unknown")).inc()

    def on_abort(self, request_id: str) -> None:
        with self._lock:
            self._last_seen.pop(request_id, None)
        self.requests.labels(self.model_name, "abort").inc()

    def on_http_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    # ------------------------------------------------------------------ scraping
    def render(self, stats: EngineStats | None, afd: dict[str, float] | None = None,
               recovery: dict | None = None) -> bytes:
        if stats is not None:
            self._set_gauges(stats)
        if recovery:
            self._count_recovery(recovery)
        for key, value in (afd or {}).items():
            self.afd_pipeline.labels(self.model_name, key.removeprefix("afd_")).set(value)
        return generate_latest(self.registry)

    def _set_gauges(self, s: EngineStats) -> None:
        name = self.model_name
        self.waiting.labels(name).set(s.num_waiting)
        self.running.labels(name).set(s.num_running)
        self.kv_usage.labels(name).set(s.kv_usage)
        self.kv_free.labels(name).set(s.num_free_kv_blocks)
        self.kv_total.labels(name).set(s.num_kv_blocks)
        self.decode_graphs.labels(name).set(s.decode_graphs)
        with self._lock:
            if s.decode_graph_replays_total > self._replays_seen:
                self.graph_replays.labels(name).inc(s.decode_graph_replays_total - self._replays_seen)
                self._replays_seen = s.decode_graph_replays_total
            prompt, gen = self._totals
            if s.prompt_tokens_total > prompt:
                self.prompt_tokens.labels(name).inc(s.prompt_tokens_total - prompt)
            if s.generation_tokens_total > gen:
                self.generation_tokens.labels(name).inc(s.generation_tokens_total - gen)
            self._totals = (max(prompt, s.prompt_tokens_total), max(gen, s.generation_tokens_total))

    def _count_recovery(self, recovery: dict) -> None:
        """Advance the counters to the executor's totals (`Executor.recovery_stats`)."""
        totals = {("restart",) + tuple(k): v for k, v in recovery.get("restarts", {}).items()}
        totals[("replay",)] = recovery.get("replays", 0)
        with self._lock:
            for key, total in totals.items():
                delta = total - self._recovery_seen.get(key, 0)
                if delta <= 0:
                    continue
                if key[0] == "restart":
                    self.afd_restarts.labels(self.model_name, key[1], key[2]).inc(delta)
                else:
                    self.afd_replays.labels(self.model_name).inc(delta)
                self._recovery_seen[key] = total

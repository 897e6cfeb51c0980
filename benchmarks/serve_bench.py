"""Load test for `afdserve serve`: N concurrent streaming clients (asyncio + httpx).

    python benchmarks/serve_bench.py --clients 300 --requests 600 --max-tokens 16
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --api-key KEY --json out.json

Without --url it starts a server itself (on --model, else the embedded default model, else a
tiny random checkpoint; token-id prompts unless --text) and stops it at the end. Bounded in count
(--requests) and time (--duration, --timeout per request): every request ends with a response,
a clear error, or a timeout, and the report counts each kind (`lost` must be 0). With
--bad-fraction some requests are deliberately invalid and must get a 4xx error; with
--disconnect-fraction some clients hang up mid-stream (the server must abort those requests).
The pieces here (workload, streaming client, server start/stop, statistics) are shared with
benchmarks/chaos_soak.py.

Reports TTFT and TPOT (mean, p50, p99), end-to-end latency, request and token throughput, errors,
and the machine (CPU model, cores, torch threads).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BAD_BODIES = [   # (what, route, fields over a good streaming body of that route; None: broken JSON)
    ("temperature -1", COMPLETIONS, {"temperature": -1}),
    ("n 0", COMPLETIONS, {"n": 0}),
    ("stop list of 5", COMPLETIONS, {"stop": ["a", "b", "c", "d", "e"]}),
    ("unknown model", COMPLETIONS, {"model": "no-such-model"}),
    ("unknown field", COMPLETIONS, {"frobnicate": True}),
    ("malformed JSON", COMPLETIONS, None),
    ("chat message without content", CHAT, {"messages": [{"role": "user"}]}),
    ("chat unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("chat empty messages", CHAT, {"messages": []}),
]


@dataclass
class Result:
    kind: str
    """ok | bad_ok (an invalid request answered with a 4xx) | disconnected (the client hung up
    mid-stream, as planned) | error | timeout"""
    status: int | None = None
    message: str = ""
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    tokens: int = 0
    start: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    """perf_counter() at each streamed token chunk."""
    plan: str = "good"
    """What the request meant to do (Workload.plan)."""


@dataclass
class Workload:
    url: str
    model: str
    headers: dict
    max_tokens: int
    prompt_len: int
    text: bool
    bad_fraction: float
    timeout: float
    rng: random.Random = field(default_factory=random.Random)
    disconnect_fraction: float = 0.0

    def plan(self) -> str:
        """What the next request does: good | bad | disconnect."""
        x = self.rng.random()
        return "bad" if x < self.bad_fraction else "disconnect" if x < self.bad_fraction + self.disconnect_fraction \
            else "good"

    def prompt(self):
        if self.text:
            return " ".join(self.rng.choice(["hello", "world", "the", "of", "and"]) for _ in range(self.prompt_len))
        return [self.rng.randrange(3, 256) for _ in range(self.prompt_len)]


async def one_request(client: httpx.AsyncClient, w: Workload, plan: str = "good") -> Result:
    """One streaming request: `plan` good, bad (an invalid body from BAD_BODIES) or disconnect
    (hang up after a few tokens)."""
    route, body, content = COMPLETIONS, {"model": w.model, "prompt": w.prompt(), "max_tokens": w.max_tokens,
                                         "stream": True, "temperature": 0, "ignore_eos": True,
                                         "stream_options": {"include_usage": True}}, None
    if plan == "bad":
        _, route, patch = w.rng.choice(BAD_BODIES)
        if route == CHAT:
            body = {"model": w.model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        if patch is None:
            content = b'{"model": "x", "prompt": '
        else:
            body.update(patch)
    hang_up = w.rng.randint(1, max(1, w.max_tokens // 2)) if plan == "disconnect" else None
    t0 = time.perf_counter()
    try:
        result = await asyncio.wait_for(_stream(client, w, route, body, content, plan == "bad", hang_up), w.timeout)
    except asyncio.TimeoutError:
        result = Result("timeout", message=f"no complete answer within {w.timeout}s")
    except httpx.HTTPError as exc:
        result = Result("error", message=f"{type(exc).__name__}: {exc}")
    result.start, result.end, result.plan = t0, time.perf_counter(), plan
    return result


async def _stream(client, w: Workload, route: str, body: dict, content: bytes | None, bad: bool,
                  hang_up: int | None = None) -> Result:
    t0 = time.perf_counter()
    kwargs = {"content": content, "headers": {**w.headers, "content-type": "application/json"}} \
        if content is not None else {"json": body, "headers": w.headers}
    async with client.stream("POST", f"{w.url}{route}", **kwargs) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:200]
            kind = "bad_ok" if bad and 400 <= r.status_code < 500 else "error"
            return Result(kind, r.status_code, message)
        if bad:
            await r.aread()
            return Result("error", 200, "an invalid request was accepted")
        first = last = None
        tokens, done, error, times = 0, False, "", []
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):   # a token arrived (text may be empty for token-id-only models)
                last = time.perf_counter()
                first = first or last
                times.append(last)
                if hang_up is not None and len(times) >= hang_up:   # leaving the block closes the connection
                    return Result("disconnected", 200, f"hung up after {len(times)} chunks", token_times=times)
    end = time.perf_counter()
    if error or not done:
        return Result("error", 200, error or "stream ended without [DONE]", token_times=times)
    tpot = (last - first) / (tokens - 1) if first and tokens > 1 else None
    return Result("ok", 200, ttft=(first - t0) if first else None, tpot=tpot, e2e=end - t0, tokens=tokens,
                  token_times=times)


async def run_load(w: Workload, clients: int, requests: int, duration: float) -> tuple[list[Result], float, int]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results: list[Result] = []
    started = 0
    deadline = time.perf_counter() + duration

    async def client_loop(c: httpx.AsyncClient):
        nonlocal started
        while started < requests and time.perf_counter() < deadline:
            started += 1
            results.append(await one_request(c, w, w.plan()))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(w.timeout, connect=30)) as c:
        await asyncio.gather(*(client_loop(c) for _ in range(clients)))
    return results, time.perf_counter() - t0, started


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    v = sorted(values)
    return {"mean": statistics.fmean(v), "p50": v[len(v) // 2], "p99": v[min(len(v) - 1, int(0.99 * len(v)))]}


def machine() -> dict:
    from afdserve.bench.vllm_peer import cpu_description
    desc = cpu_description()
    cpu, flags = desc["cpu"], desc["flags"]
    try:
        import torch
        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": threads,
            "torch_threads_note": "torch default in this process; the server leaves torch at its default",
            "python": platform.python_version()}


def report(results: list[Result], wall: float, started: int) -> dict:
    ok = [r for r in results if r.kind == "ok"]
    counts = {k: sum(r.kind == k for r in results) for k in ("ok", "bad_ok", "disconnected", "error", "timeout")}
    counts["started"], counts["lost"] = started, started - len(results)
    errors: dict[str, int] = {}
    for r in results:
        if r.kind in ("error", "timeout"):
            errors[f"{r.status}: {r.message[:80]}"] = errors.get(f"{r.status}: {r.message[:80]}", 0) + 1
    tokens = sum(r.tokens for r in ok)
    return {"counts": counts, "errors": errors, "wall_s": wall,
            "request_throughput": len(ok) / wall if wall else 0.0,
            "output_token_throughput": tokens / wall if wall else 0.0,
            "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
            "tpot_s": _stats([r.tpot for r in ok if r.tpot is not None]),
            "e2e_s": _stats([r.e2e for r in ok if r.e2e is not None]),
            "machine": machine()}


def print_report(rep: dict) -> None:
    c = rep["counts"]
    print(f"requests: {c['started']} started, {c['ok']} ok, {c['bad_ok']} rejected as intended, "
          f"{c['disconnected']} hung up as planned, {c['error']} errors, {c['timeout']} timeouts, "
          f"{c['lost']} lost  ({rep['wall_s']:.1f} s)")
    for name in ("ttft_s", "tpot_s", "e2e_s"):
        s = rep[name]
        if s["mean"] is not None:
            print(f"{name[:-2].upper():5s} mean {s['mean'] * 1e3:8.1f} ms  p50 {s['p50'] * 1e3:8.1f} ms  "
                  f"p99 {s['p99'] * 1e3:8.1f} ms")
    print(f"throughput: {rep['request_throughput']:.2f} req/s, {rep['output_token_throughput']:.1f} output tok/s")
    for msg, n in rep["errors"].items():
        print(f"  error x{n}: {msg}")
    m = rep["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}")


# ---------------------------------------------------------------- own server
def start_server(args, extra: list[str] = ()) -> tuple[subprocess.Popen, str, Path]:
    """`afdserve serve` on a free loopback port, in its own session (so its workers can be
    stopped with it), once /health answers 200; `extra` are more `serve` options."""
    model = args.model
    if model is None:
        from afdserve.engine.engine import DEFAULT_MODEL_DIR
        if not DEFAULT_MODEL_DIR.is_dir():
            from afdserve.config import get_preset
            from afdserve.model.checkpoint import init_checkpoint
            model = str(init_checkpoint(get_preset("tiny"), tempfile.mkdtemp(prefix="serve_bench_"), seed=0))
            print(f"no embedded model: using a tiny random checkpoint at {model}")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(prefix="serve_bench_", suffix=".log")[1])
    cmd = [sys.executable, "-m", "afdserve", "serve", "--port", str(port), "--served-model-name", args.model_name,
           "--no-access-log", "--log-level", "warning", "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--model", model] if model else []
    cmd += ["--num-kv-blocks", str(args.num_kv_blocks)] if args.num_kv_blocks else []
    cmd += ["--afd", args.afd] if args.afd else []
    cmd += list(extra)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"the server did not become healthy:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (workers included), then SIGKILL to whatever of the
    group is left (a SIGSTOPped worker, or workers of a server that died)."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="server to drive (default: start one)")
    p.add_argument("--model", default=None, help="checkpoint for the server started here")
    p.add_argument("--model-name", default="bench", help="served model name (must match with --url)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--afd", default=None, help="topology for the server started here, e.g. 2A1F")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=None, help="requests in all (default 2 x clients)")
    p.add_argument("--duration", type=float, default=120.0, help="stop starting requests after this many s")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request limit in s")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length in tokens (words with --text)")
    p.add_argument("--text", action="store_true", help="text prompts (the model needs a tokenizer)")
    p.add_argument("--bad-fraction", type=float, default=0.0, help="share of deliberately invalid requests")
    p.add_argument("--disconnect-fraction", type=float, default=0.0,
                   help="share of clients that hang up mid-stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)

    proc = None
    try:
        if args.url is None:
            proc, url, log = start_server(args)
            print(f"started a server at {url} (log: {log})")
        else:
            url = args.url.rstrip("/")
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        w = Workload(url, args.model_name, headers, args.max_tokens, args.prompt_len, args.text,
                     args.bad_fraction, args.timeout, random.Random(args.seed), args.disconnect_fraction)
        results, wall, started = asyncio.run(run_load(w, args.clients, args.requests or 2 * args.clients,
                                                      args.duration))
    finally:
        if proc is not None:
            stop_server(proc)
    rep = report(results, wall, started)
    rep["config"] = {k: v for k, v in vars(args).items() if k != "api_key"}
    print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    c = rep["counts"]
    return 0 if c["lost"] == 0 and c["error"] == 0 and c["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

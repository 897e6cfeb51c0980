"""Chaos soak of an AFD deployment: streaming load with malformed requests and clients that hang
up, while one FFN worker is killed (SIGKILL) and later another is stalled (SIGSTOP, then SIGCONT).

    python benchmarks/chaos_soak.py                                   # 1A2F, tiny random model, 300 clients, 180 s
    python benchmarks/chaos_soak.py --duration 60 --clients 200 --json soak.json

It starts `afdserve serve --afd ...` on a free loopback port (on a tiny random checkpoint made
here unless --model is given), drives it with benchmarks/serve_bench.py's streaming clients,
bounded in count (--requests) and time (--duration, --timeout per request), injects the faults at
--kill-at and --stall-at (fractions of --duration), polls /health throughout, and stops the
server and its workers at the end, whatever happened. FFN workers are found as the server's child
processes running `afdserve.afd.cli worker --role ffn` (looked up again before each fault, so a
replaced worker is found under its new pid).

Report: requests ok / rejected (malformed, answered 4xx as they must be) / hung up (as planned) /
failed (a good request that got an error, or a malformed one that was not rejected) / lost (no
answer within --timeout); inter-token latency (TPOT: gaps between a stream's token chunks, each
counted in the phase holding its midpoint) p50/p99/max and TTFT p99 in each phase (before,
during and after each fault; a fault's 'during' lasts until /health is 200 again, or --during-s when /health
never turned); every /health transition; AFD restarts and replays from /metrics. Exit status 0
only when nothing failed or was lost, /health recovered after each fault, and no request was left
running.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import Result, Workload, _stats, machine, run_load, start_server, stop_server  # noqa: E402


@dataclass
class Event:
    t: float
    """perf_counter() time."""
    what: str
    detail: str = ""


# ------------------------------------------------------------------ worker processes
def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], start time [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def afd_workers(server_pid: int) -> dict[tuple[str, int], tuple[int, str]]:
    """(role, rank) -> (pid, start time) of the server's worker processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if not stat or stat[1] != str(server_pid):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "afdserve.afd.cli" in argv and "--role" in argv and "--rank" in argv:
            role, rank = argv[argv.index("--role") + 1], argv[argv.index("--rank") + 1]
            found[(role, int(rank))] = (int(entry.name), stat[19])
    return found


def _same_process(pid: int, start: str) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[19] == start


async def _at(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.perf_counter()))


def _pick_ffn(server_pid: int, prefer: int) -> tuple[int, int, str] | None:
    ffn = {rank: ps for (role, rank), ps in afd_workers(server_pid).items() if role == "ffn"}
    if not ffn:
        return None
    rank = prefer if prefer in ffn else min(ffn)
    return (rank, *ffn[rank])


async def inject_faults(server_pid: int, t0: float, args, events: list[Event], stopped: list) -> None:
    """SIGKILL FFN worker 0 at kill_at; SIGSTOP FFN worker 1 (0 with one) at stall_at, SIGCONT
    stall_s later if that same process is still there (the runtime may have replaced it)."""
    await _at(t0 + args.kill_at * args.duration)
    victim = _pick_ffn(server_pid, 0)
    if victim is None:
        events.append(Event(time.perf_counter(), "kill", "skipped: no FFN worker process found"))
    else:
        os.kill(victim[1], signal.SIGKILL)
        events.append(Event(time.perf_counter(), "kill", f"SIGKILL FFN worker {victim[0]} (pid {victim[1]})"))
    await _at(t0 + args.stall_at * args.duration)
    victim = _pick_ffn(server_pid, 1)
    if victim is None:
        events.append(Event(time.perf_counter(), "stall", "skipped: no FFN worker process found"))
        return
    rank, pid, start = victim
    os.kill(pid, signal.SIGSTOP)
    stopped.append((pid, start))
    events.append(Event(time.perf_counter(), "stall", f"SIGSTOP FFN worker {rank} (pid {pid})"))
    await asyncio.sleep(args.stall_s)
    resume_stalled(stopped, events)


def resume_stalled(stopped: list, events: list[Event] | None = None) -> None:
    """SIGCONT each process this soak stopped, if it is still the same process."""
    while stopped:
        pid, start = stopped.pop()
        alive = _same_process(pid, start)
        if alive:
            os.kill(pid, signal.SIGCONT)
        if events is not None:
            events.append(Event(time.perf_counter(), "resume", f"SIGCONT pid {pid}" if alive else
                                f"pid {pid} already gone (replaced), nothing to resume"))


# ------------------------------------------------------------------ /health and /metrics
async def watch_health(url: str, done: asyncio.Event, transitions: list[Event], every_s: float = 0.25) -> None:
    """Record each change of /health's answer (status code, or 'no answer')."""
    last = object()
    async with httpx.AsyncClient(timeout=2.0) as c:
        while not done.is_set():
            try:
                r = await c.get(f"{url}/health")
                state = r.status_code
                detail = "" if r.status_code == 200 else r.json().get("error", {}).get("message", r.text)[:160]
            except (httpx.HTTPError, ValueError) as exc:
                state, detail = None, type(exc).__name__
            if state != last:
                transitions.append(Event(time.perf_counter(), str(state or "no answer"), detail))
                last = state
            try:
                await asyncio.wait_for(done.wait(), every_s)
            except asyncio.TimeoutError:
                pass


def metric_values(url: str, prefix: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def settle(url: str, timeout_s: float) -> dict:
    """After the load: wait for /health 200 and no running requests; what was seen."""
    deadline = time.monotonic() + timeout_s
    healthy = running = None
    while time.monotonic() < deadline:
        try:
            healthy = httpx.get(f"{url}/health", timeout=2).status_code == 200
            running = sum(metric_values(url, "afdserve_num_requests_running").values())
        except httpx.HTTPError:
            healthy = None
        if healthy and running == 0:
            break
        time.sleep(0.5)
    recovery = {}
    try:
        recovery = {**metric_values(url, "afdserve_afd_worker_restarts_total"),
                    **metric_values(url, "afdserve_afd_step_replays_total")}
    except httpx.HTTPError:
        pass
    return {"healthy_at_end": healthy, "requests_running_at_end": running, "afd_recovery_metrics": recovery}


# ------------------------------------------------------------------ analysis
def outcome(r: Result) -> str:
    """ok | rejected | hung up | failed | lost, from what the request meant to do and what it got."""
    if r.kind == "timeout":
        return "lost"
    if r.plan == "bad":
        return "rejected" if r.kind == "bad_ok" else "failed"
    return {"ok": "ok", "disconnected": "hung up"}.get(r.kind, "failed")


def _recovered_at(t: float, until: float, health: list[Event]) -> float | None:
    """None when /health did not turn non-200 in [t, until); else when it was 200 again (or `until`)."""
    bad = next((h.t for h in health if t <= h.t < until and h.what != "200"), None)
    if bad is None:
        return None
    good = next((h.t for h in health if h.t > bad and h.what == "200"), None)
    return good if good is not None and good < until else until


def phases(t_start: float, t_end: float, faults: list[Event], health: list[Event], during_s: float) -> list:
    """(name, from, to): before the faults, then 'during X' and 'after X' for each fault."""
    cuts = [("before faults", t_start)]
    for i, f in enumerate(faults):
        nxt = faults[i + 1].t if i + 1 < len(faults) else t_end
        recovered = _recovered_at(f.t, nxt, health)
        cuts += [(f"during {f.what}", f.t), (f"after {f.what}", min(nxt, recovered or f.t + during_s))]
    ends = [t for _, t in cuts[1:]] + [t_end]
    return [(name, lo, max(lo, hi)) for (name, lo), hi in zip(cuts, ends)]


def phase_rows(results: list[Result], windows: list, t0: float) -> list[dict]:
    """Per phase: the inter-token gaps (TPOT) whose midpoint falls in it (a gap stretched by a fault
    counts in the fault's phase), TTFT of the first tokens that arrived in it (a fault that hits
    between two cohorts of requests shows there, not in the gaps), and the outcomes of the
    requests that ended in it."""
    rows = []
    for name, lo, hi in windows:
        gaps = [b - a for r in results for a, b in zip(r.token_times, r.token_times[1:]) if lo <= (a + b) / 2 < hi]
        ttfts = [r.token_times[0] - r.start for r in results if r.token_times and lo <= r.token_times[0] < hi]
        ended = [outcome(r) for r in results if lo <= r.end < hi]
        rows.append({"phase": name, "from_s": lo - t0, "to_s": hi - t0, "gaps": len(gaps), "tpot_s": _stats(gaps),
                     "max_gap_s": max(gaps, default=None), "ttft_s": _stats(ttfts),
                     **{k: ended.count(k) for k in ("ok", "rejected", "hung up", "failed", "lost")}})
    return rows


def fault_health(faults: list[Event], health: list[Event], t_end: float) -> list[dict]:
    out = []
    for i, f in enumerate(faults):
        nxt = faults[i + 1].t if i + 1 < len(faults) else t_end
        bad = next((h for h in health if f.t <= h.t < nxt and h.what != "200"), None)
        good = next((h for h in health if bad and h.t > bad.t and h.what == "200"), None)
        out.append({"fault": f.what, "detail": f.detail, "unhealthy_after_s": bad and bad.t - f.t,
                    "unhealthy_status": bad and bad.what, "unhealthy_message": bad and bad.detail,
                    "healthy_again_after_s": good and good.t - f.t})
    return out


async def soak(server_pid: int, url: str, args, stopped: list) -> dict:
    w = Workload(url, args.model_name, {}, args.max_tokens, args.prompt_len, False, args.bad_fraction,
                 args.timeout, random.Random(args.seed), args.disconnect_fraction)
    events: list[Event] = []
    health: list[Event] = []
    done = asyncio.Event()
    t0 = time.perf_counter()
    watcher = asyncio.ensure_future(watch_health(url, done, health))
    chaos = asyncio.ensure_future(inject_faults(server_pid, t0, args, events, stopped))
    try:
        results, wall, started = await run_load(w, args.clients, args.requests, args.duration)
    finally:
        chaos.cancel()
        resume_stalled(stopped, events)
        done.set()
        await asyncio.gather(watcher, chaos, return_exceptions=True)
    t_end = time.perf_counter()
    faults = [e for e in events if e.what in ("kill", "stall") and not e.detail.startswith("skipped")]
    outcomes = [outcome(r) for r in results]
    counts = {k: outcomes.count(k) for k in ("ok", "rejected", "hung up", "failed", "lost")}
    counts["started"], counts["lost"] = started, counts["lost"] + started - len(results)
    failures: dict[str, int] = {}
    for r, o in zip(results, outcomes):
        if o in ("failed", "lost"):
            key = f"{r.plan} -> {r.status}: {r.message[:100]}"
            failures[key] = failures.get(key, 0) + 1
    rel = [asdict(e) | {"t": e.t - t0} for e in events]
    return {"counts": counts, "wall_s": wall, "failures": failures, "events": rel,
            "health": [asdict(h) | {"t": h.t - t0} for h in health],
            "faults": fault_health(faults, health, t_end),
            "phases": phase_rows(results, phases(t0, t_end, faults, health, args.during_s), t0)}


# ------------------------------------------------------------------ report
def _ms(v: float | None) -> str:
    return f"{v * 1e3:9.1f}" if v is not None else "        -"


def verdict(rep: dict) -> list[str]:
    """What missed the target (empty: passed)."""
    c, problems = rep["counts"], []
    if c["failed"] or c["lost"]:
        problems.append(f"{c['failed']} failed and {c['lost']} lost requests")
    for f in rep["faults"]:
        if f["unhealthy_after_s"] is not None and f["healthy_again_after_s"] is None:
            problems.append(f"/health did not recover after the {f['fault']} before the next phase")
    if len(rep["faults"]) < 2:
        problems.append(f"only {len(rep['faults'])} of 2 faults were injected")
    if not rep.get("healthy_at_end"):
        problems.append("the server was not healthy at the end")
    if rep.get("requests_running_at_end"):
        problems.append(f"{rep['requests_running_at_end']:.0f} requests still running at the end")
    return problems


def print_report(rep: dict) -> None:
    cfg, c = rep["config"], rep["counts"]
    print(f"\nchaos soak: --afd {cfg['afd']}, {cfg['clients']} clients, {cfg['duration']:.0f} s, "
          f"max {cfg['requests']} requests, {cfg['bad_fraction']:.0%} malformed, "
          f"{cfg['disconnect_fraction']:.0%} hang up, --afd-timeout {cfg['afd_timeout']}")
    print(f"requests: {c['started']} started: {c['ok']} ok, {c['rejected']} rejected (malformed, 4xx), "
          f"{c['hung up']} hung up (as planned), {c['failed']} failed, {c['lost']} lost  ({rep['wall_s']:.1f} s)")
    for e in rep["events"]:
        print(f"  +{e['t']:6.1f} s  {e['what']}: {e['detail']}")
    for f in rep["faults"]:
        turned = (f"/health {f['unhealthy_status']} after {f['unhealthy_after_s']:.1f} s "
                  f"({f['unhealthy_message']})" if f["unhealthy_after_s"] is not None else "/health never turned")
        back = (f"200 again after {f['healthy_again_after_s']:.1f} s" if f["healthy_again_after_s"] is not None
                else "not 200 again" if f["unhealthy_after_s"] is not None else "")
        print(f"  {f['fault']}: {turned}; {back}")
    print(f"{'phase':14s} {'from s':>7s} {'to s':>7s} {'gaps':>6s} {'TPOT p50 ms':>12s} {'TPOT p99 ms':>12s} "
          f"{'max gap ms':>11s} {'TTFT p99 ms':>12s} {'ok':>5s} {'rej':>4s} {'hung':>5s} {'fail':>5s} {'lost':>5s}")
    for p in rep["phases"]:
        print(f"{p['phase']:14s} {p['from_s']:7.1f} {p['to_s']:7.1f} {p['gaps']:6d} {_ms(p['tpot_s']['p50']):>12s} "
              f"{_ms(p['tpot_s']['p99']):>12s} {_ms(p['max_gap_s']):>11s} {_ms(p['ttft_s']['p99']):>12s} "
              f"{p['ok']:5d} {p['rejected']:4d} "
              f"{p['hung up']:5d} {p['failed']:5d} {p['lost']:5d}")
    for msg, n in sorted(rep["failures"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"  x{n}: {msg}")
    print(f"end: healthy {rep.get('healthy_at_end')}, requests running {rep.get('requests_running_at_end')}, "
          f"AFD recovery metrics {rep.get('afd_recovery_metrics') or 'none'}")
    m = rep["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores (shared: compare phases within one run, not absolute times)")
    problems = verdict(rep)
    print("verdict: " + ("PASS (0 failed, 0 lost, healthy again after each fault)" if not problems
                         else "FAIL: " + "; ".join(problems)))


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--afd", default="1A2F", help="topology (default 1A2F: the stall hits the FFN worker not killed)")
    p.add_argument("--model", default=None, help="checkpoint (default: a tiny random one made here)")
    p.add_argument("--model-name", default="soak")
    p.add_argument("--clients", type=int, default=300, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=20000, help="requests in all, at most")
    p.add_argument("--duration", type=float, default=180.0, help="stop starting requests after this many s")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request limit in s (past it: lost)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length in token ids")
    p.add_argument("--bad-fraction", type=float, default=0.1, help="share of malformed requests")
    p.add_argument("--disconnect-fraction", type=float, default=0.1, help="share of clients that hang up mid-stream")
    p.add_argument("--kill-at", type=float, default=0.25, help="SIGKILL an FFN worker at this fraction of --duration")
    p.add_argument("--stall-at", type=float, default=0.6, help="SIGSTOP another at this fraction of --duration")
    p.add_argument("--stall-s", type=float, default=10.0, help="how long the stalled worker stays stopped")
    p.add_argument("--during-s", type=float, default=10.0,
                   help="length of a fault's 'during' phase when /health never turned non-200")
    p.add_argument("--afd-timeout", type=float, default=5.0, help="the server's --afd-timeout")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--settle-s", type=float, default=30.0, help="wait this long at the end for health and idleness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if not 0 < args.kill_at < args.stall_at < 1:
        p.error("need 0 < --kill-at < --stall-at < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from afdserve.config import get_preset
        from afdserve.model.checkpoint import init_checkpoint
        args.model = str(init_checkpoint(get_preset("tiny"), tempfile.mkdtemp(prefix="chaos_soak_"), seed=0))
    proc, stopped = None, []
    try:
        proc, url, log = start_server(args, ["--afd-timeout", str(args.afd_timeout)])
        print(f"started `afdserve serve --afd {args.afd}` at {url} (pid {proc.pid}, log: {log}); "
              f"workers: {sorted(afd_workers(proc.pid))}", flush=True)
        rep = asyncio.run(soak(proc.pid, url, args, stopped))
        rep.update(settle(url, args.settle_s))
    finally:
        resume_stalled(stopped)
        if proc is not None:
            stop_server(proc)
    rep["config"], rep["machine"], rep["server_log"] = vars(args), machine(), str(log)
    print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2, default=str))
    return 1 if verdict(rep) else 0


if __name__ == "__main__":
    sys.exit(main())

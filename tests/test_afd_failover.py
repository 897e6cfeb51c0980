"""AFD failover on 127.0.0.1 over gloo: FFN workers killed (SIGKILL) or stalled (SIGSTOP) while a
request runs or while the deployment is idle; the deployment replaces them and replays the
interrupted step, so greedy outputs equal colocated ones token for token.

One deployment per topology (module scope, a private copy of the checkpoint: the last test
makes it unloadable); the tests run in file order on it.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from afdserve.afd.executor import free_port
from afdserve.engine.engine import EngineDeadError
from afdserve.engine.llm import LLM
from afdserve.sampling import SamplingParams

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
TIMEOUT_S = 6.0
_ids = itertools.count()


def _opts(**extra) -> dict:
    return {"timeout_s": TIMEOUT_S, "threads_per_worker": 1, "join_timeout_s": 60, **extra}


def _llm(ckpt, topo: str, **extra) -> LLM:
    return LLM(model=str(ckpt), device="cpu", dtype="float32", afd=topo, micro_batches=2,
               afd_options=_opts(**extra), num_kv_blocks=64, block_size=4)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("failover") / "ckpt")


@pytest.fixture(scope="module")
def reference(ckpt):
    with LLM(model=str(ckpt), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def deployments(ckpt):
    llms: dict[str, LLM] = {}

    def get(topo: str) -> LLM:
        if topo not in llms:
            llms[topo] = _llm(ckpt, topo)
        return llms[topo]
    yield get
    for llm in llms.values():
        llm.close()


class HealthLog:
    """Polls health() in a thread; the distinct values seen, in order."""

    def __init__(self, source):
        self.source, self.seen, self._stop = source, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            h = self.source()
            if not self.seen or self.seen[-1] != h:
                self.seen.append(h)
            time.sleep(0.02)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.seen


def _generate_with_fault(llm: LLM, fault) -> list:
    """Run PROMPTS step by step; `fault()` fires from a timer once the first tokens exist, so it
    lands in the middle of a step or between two; returns the finished outputs in prompt order."""
    eng = llm.engine
    rids = [f"r{next(_ids)}" for _ in PROMPTS]
    for rid, p in zip(rids, PROMPTS):
        eng.add_request(rid, p, GREEDY)
    done = {}
    for o in eng.step() + eng.step():
        done[o.request_id] = o
    timer = threading.Timer(0.02, fault)
    timer.start()
    deadline = time.monotonic() + 120
    while eng.has_unfinished_requests() and time.monotonic() < deadline:
        for o in eng.step():
            done[o.request_id] = o
    timer.join()
    assert not eng.has_unfinished_requests(), "requests did not finish"
    return [done[rid] for rid in rids]


def _check_replayed(llm: LLM, outs, reference, restarts_before: int, replays_before: int) -> None:
    assert [o.error for o in outs] == [None] * len(outs)
    assert [o.outputs[0].token_ids for o in outs] == reference
    stats = llm.engine.executor.recovery_stats()
    assert sum(stats["restarts"].values()) == restarts_before + 1, stats
    assert stats["replays"] >= replays_before, stats
    assert llm.engine.health() is None


def _await_health(ex, want_problem: bool, timeout_s: float) -> tuple[str | None, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        h = ex.health()
        if (h is not None) == want_problem:
            return h, time.monotonic() - t0
        time.sleep(0.02)
    return ex.health(), time.monotonic() - t0


def _totals(llm: LLM) -> tuple[int, int]:
    s = llm.engine.executor.recovery_stats()
    return sum(s["restarts"].values()), s["replays"]


@pytest.mark.parametrize("topo,sig,victim", [("1A1F", signal.SIGKILL, "FFN worker 0"),
                                             ("1A1F", signal.SIGSTOP, "FFN worker 0"),
                                             ("1A2F", signal.SIGSTOP, "FFN worker 1"),
                                             ("1A2F", signal.SIGKILL, "FFN worker 0")])
def test_ffn_lost_mid_request_is_replaced_and_the_step_replayed(deployments, reference, topo, sig, victim):
    llm = deployments(topo)
    ex = llm.engine.executor
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    restarts, replays = _totals(llm)
    pid = ex.pids[victim]
    health = HealthLog(ex.health)
    outs = _generate_with_fault(llm, lambda: os.kill(pid, sig))
    seen = health.stop()
    _check_replayed(llm, outs, reference, restarts, replays)
    assert ex.pids[victim] != pid
    assert any(h and victim in h for h in seen), seen      # unhealthy, naming the worker ...
    assert seen[-1] is None                                 # ... and healthy again


@pytest.mark.parametrize("topo,sig,victim", [("1A1F", signal.SIGSTOP, "FFN worker 0"),
                                             ("1A1F", signal.SIGKILL, "FFN worker 0"),
                                             ("1A2F", signal.SIGKILL, "FFN worker 0"),
                                             ("1A2F", signal.SIGSTOP, "FFN worker 1")])
def test_ffn_lost_while_idle_is_replaced(deployments, reference, topo, sig, victim):
    llm = deployments(topo)
    ex = llm.engine.executor
    restarts, _ = _totals(llm)
    pid = ex.pids[victim]
    os.kill(pid, sig)
    problem, after = _await_health(ex, True, TIMEOUT_S)
    assert problem and victim in problem and after < TIMEOUT_S, (problem, after)
    problem, after = _await_health(ex, False, 90)
    assert problem is None, problem
    assert ex.pids[victim] != pid and _totals(llm)[0] == restarts + 1
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_attention_worker_lost_with_one_fails_its_requests_and_restarts(deployments, reference):
    llm = deployments("1A1F")
    eng, ex = llm.engine, llm.engine.executor
    pid = ex.pids["attention worker 0"]
    outs = _generate_with_fault(llm, lambda: os.kill(pid, signal.SIGKILL))
    errors = [o.error for o in outs]
    assert any(errors), "a request that lost its KV cache cannot finish"
    assert all("attention worker 0" in e and "lost with the worker's KV cache" in e for e in errors if e), errors
    assert ex.pids["attention worker 0"] != pid and eng.health() is None
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_worker_that_fails_at_every_start_ends_in_a_clear_error(deployments, ckpt):
    llm = deployments("1A1F")
    eng, ex = llm.engine, llm.engine.executor
    ex.afd = dataclasses.replace(ex.afd, max_start_attempts=2)
    moved = ckpt.with_name("ckpt-moved")
    ckpt.rename(moved)             # running workers keep their mapped weights; a new one cannot load
    try:
        os.kill(ex.pids["FFN worker 0"], signal.SIGKILL)
        problem, _ = _await_health(ex, True, TIMEOUT_S)
        assert problem is not None
        t0 = time.monotonic()
        while "failed to start" not in (eng.health() or "") and time.monotonic() - t0 < 90:
            time.sleep(0.1)
        assert "FFN worker 0" in eng.health() and "failed to start 2 times in a row" in eng.health()
        with pytest.raises(RuntimeError, match="failed to start 2 times in a row"):
            llm.generate(PROMPTS[:1], GREEDY)
        with pytest.raises(EngineDeadError):
            eng.add_request("after", PROMPTS[0])
    finally:
        moved.rename(ckpt)


def test_remote_ffn_slot_is_reopened_and_a_new_worker_rejoins(ckpt, reference, tmp_path):
    port = free_port()
    log = open(tmp_path / "ffn.log", "wb")
    cmd = [sys.executable, "-m", "afdserve.afd.cli", "worker", "--role", "ffn", "--afd", "1A2F", "--master-addr",
           "127.0.0.1", "--master-port", str(port), "--model", str(ckpt), "--device", "cpu", "--threads", "1",
           "--join-timeout", "60", "--dtype", "float32"]
    procs = [subprocess.Popen(cmd + ["--rank", str(k)], stdout=subprocess.DEVNULL, stderr=log) for k in range(2)]
    llm = None
    try:
        llm = _llm(ckpt, "1A2F", ffn_remote=True, master_port=port, rejoin_timeout_s=60)
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference

        def lose_and_replace():
            procs[1].kill()
            procs[1].wait()
            procs.append(subprocess.Popen(cmd + ["--rank", "1"], stdout=subprocess.DEVNULL, stderr=log))
        outs = _generate_with_fault(llm, lose_and_replace)
        assert [o.error for o in outs] == [None] * len(outs)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert procs[0].poll() is None and procs[2].poll() is None     # the survivor rejoined by itself
        assert llm.engine.health() is None and llm.engine.executor.replays >= 1
    finally:
        if llm is not None:
            llm.close()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
    assert procs[0].returncode == 0 and procs[2].returncode == 0, (tmp_path / "ffn.log").read_text()


def test_attention_worker_lost_with_two_requeues_its_requests(ckpt, reference):
    """2A1F: the lost worker's requests are recomputed on the other attention worker; none fails."""
    with _llm(ckpt, "2A1F") as llm:
        ex = llm.engine.executor
        pid = ex.pids["attention worker 1"]
        outs = _generate_with_fault(llm, lambda: os.kill(pid, signal.SIGKILL))
        assert [o.error for o in outs] == [None] * len(outs)
        assert [len(o.outputs[0].token_ids) for o in outs] == [GREEDY.max_tokens] * len(outs)
        # Recompute is a prefill of prompt + tokens so far: equal to the undisturbed run up to
        # float rounding, which on this random model has no near-ties at these positions.
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert ex.pids["attention worker 1"] != pid and llm.engine.health() is None
        assert ex.restarts[("attention", "exited")] == 1


def _child_pids(parent: int, needle: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and needle in cmd:
            out.append(int(d))
    return out


def test_server_health_names_a_stalled_idle_ffn_worker_then_recovers(ckpt, tmp_path):
    """`afdserve serve --afd 1A1F`: an FFN worker stopped while the server is idle turns /health
    503 naming it within --afd-timeout; it is replaced, /health is 200 again, /metrics counts it."""
    httpx = pytest.importorskip("httpx")
    port = free_port()
    cmd = [sys.executable, "-m", "afdserve", "serve", "--model", str(ckpt), "--port", str(port), "--afd", "1A1F",
           "--afd-timeout", str(TIMEOUT_S), "--dtype", "float32", "--num-kv-blocks", "64", "--log-level", "warning",
           "--no-access-log", "--shutdown-timeout", "1"]
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def health():
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            return r.status_code, r.text
        except httpx.HTTPError as exc:
            return None, str(exc)
    try:
        deadline = time.monotonic() + 180
        while health()[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        [ffn] = _child_pids(proc.pid, "--role ffn")
        os.kill(ffn, signal.SIGSTOP)
        t0 = time.monotonic()
        while (h := health())[0] == 200 and time.monotonic() - t0 < TIMEOUT_S:
            time.sleep(0.05)
        assert h[0] == 503 and "FFN worker 0" in h[1] and time.monotonic() - t0 < TIMEOUT_S, h
        while (h := health())[0] != 200 and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        assert h[0] == 200, h
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert re.search(r'afdserve_afd_worker_restarts_total\{[^}]*reason="stopped",role="ffn"\} 1\.0', metrics)
        r = httpx.post(f"{url}/v1/completions", json={"model": ckpt.name, "prompt": [1, 2, 3], "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_metrics_count_restarts_and_replays_by_delta():
    from afdserve.server.metrics import ServerMetrics
    m = ServerMetrics("tiny")
    m.render(None, None, {"restarts": {("ffn", "exited"): 1}, "replays": 1})
    text = m.render(None, None, {"restarts": {("ffn", "exited"): 2, ("ffn", "stopped"): 1}, "replays": 3}).decode()
    assert 'afdserve_afd_worker_restarts_total{model_name="tiny",reason="exited",role="ffn"} 2.0' in text
    assert 'afdserve_afd_worker_restarts_total{model_name="tiny",reason="stopped",role="ffn"} 1.0' in text
    assert 'afdserve_afd_step_replays_total{model_name="tiny"} 3.0' in text

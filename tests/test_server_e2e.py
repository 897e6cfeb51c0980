"""`afdserve serve` as a real process, driven with the official `openai` client.

One server for the module (started with --api-key); the SIGTERM test starts its own.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest_server import free_port, make_text_checkpoint

openai = pytest.importorskip("openai")

MODEL = "tiny-e2e"
KEY = "e2e-key"
GREEDY = {"temperature": 0}
NO_EOS = {"extra_body": {"ignore_eos": True}}


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _launch(tmp, *extra: str, entry: tuple[str, ...] = ("-m", "afdserve")) -> Server:
    """`afdserve serve` (run as `python *entry serve ...`) on a free port over a fresh tiny
    checkpoint in `tmp`, healthy; the caller stops it with _stop(server.proc)."""
    ckpt = make_text_checkpoint(tmp / "model")
    port = free_port()
    log_path = tmp / "server.log"
    cmd = [sys.executable, *entry, "serve", "--model", str(ckpt), "--port", str(port),
           "--served-model-name", MODEL, "--api-key", KEY, "--num-kv-blocks", "64", "--max-num-seqs", "16",
           "--no-access-log", "--log-level", "warning", "--shutdown-timeout", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server did not become healthy:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    except BaseException:
        _stop(proc)
        raise
    return Server(proc, url, log_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = _launch(tmp_path_factory.mktemp("server_e2e"))
    try:
        yield s
    finally:
        _stop(s.proc)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_startup_summary_and_auth(server, client):
    assert "afdserve serve: model tiny-e2e" in server.log() and "colocated" in server.log()
    assert [m.id for m in client.models.list()] == [MODEL]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=10)
    assert r.status_code == 401
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hello")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hello", temperature=-1)


def test_completion_n_stop_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, logprobs=2, **GREEDY, **NO_EOS)
    text = out.choices[0].text
    assert out.usage.completion_tokens == 8 and len(out.choices[0].logprobs.tokens) == 8
    assert all(len(t) == 2 for t in out.choices[0].logprobs.top_logprobs)
    stop = " " + text.split()[4]
    cut = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, stop=stop, **GREEDY, **NO_EOS)
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model=MODEL, prompt=["hello", "world"], n=2, max_tokens=3, seed=1)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]


def test_chat_and_streaming(client):
    messages = [{"role": "user", "content": "hello world"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True,
                                          top_logprobs=2, **GREEDY, **NO_EOS)
    content = full.choices[0].message.content
    assert len(content.split()) == 6 and len(full.choices[0].logprobs.content) == 6
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY, **NO_EOS)
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == content and usage.completion_tokens == 6
    comp = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, stream=True, **GREEDY, **NO_EOS)
    assert len("".join(c.choices[0].text for c in comp).split()) == 5


def test_disconnect_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 600, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            while got < 3:
                if next(lines).startswith("data: "):
                    got += 1
            assert _metric(server, "afdserve_kv_cache_usage_perc") > 0
    _wait_all_free(server)


def _wait_all_free(server) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (_metric(server, "afdserve_kv_cache_usage_perc") == 0
                and _metric(server, "afdserve_num_requests_running") == 0):
            break
        time.sleep(0.1)
    assert _metric(server, "afdserve_kv_cache_usage_perc") == 0
    assert _metric(server, "afdserve_num_requests_running") == 0
    assert _metric(server, "afdserve_kv_free_blocks") == _metric(server, "afdserve_kv_total_blocks")


def test_disconnect_non_streaming_aborts(server):
    """A client that goes away while its non-streaming request runs: the request is aborted. The
    client closes its socket once /metrics shows the request running, however fast the server."""
    body = json.dumps({"model": MODEL, "prompt": "hello world", "max_tokens": 1000, "ignore_eos": True}).encode()
    port = int(server.url.rsplit(":", 1)[1])
    before = _aborted(server)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while _metric(server, "afdserve_num_requests_running") < 1:
            assert time.monotonic() < deadline, "the request never showed as running"
            time.sleep(0.01)
    _wait_all_free(server)
    assert _aborted(server) == before + 1


def _aborted(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    m = re.search(r'^afdserve_request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _serve_with_step(patched_step: str) -> str:
    """`afdserve serve` as a `python -c` script whose LLMEngine.step is `patched_step` (the source of
    a `patched_step(self)` that calls the original `step(self)`)."""
    return ("import os, sys, time\nfrom afdserve.engine import engine\nstep = engine.LLMEngine.step\n"
            f"{patched_step}\nengine.LLMEngine.step = patched_step\nfrom afdserve.cli import main\n"
            "sys.argv[0] = 'afdserve'\nsys.exit(main(sys.argv[1:]))\n")


# `afdserve serve` whose engine step raises once the file named by AFDSERVE_TEST_FAIL exists.
_FAILING_SERVE = _serve_with_step("""def patched_step(self):
    if os.path.exists(os.environ["AFDSERVE_TEST_FAIL"]):
        raise RuntimeError("injected engine failure")
    return step(self)""")


def test_engine_failure_mid_stream_ends_the_stream_and_server_stays_up(tmp_path, monkeypatch):
    """The engine's step fails after the 200 and the first tokens were sent: the stream ends with
    an SSE error event and [DONE], and the server process keeps answering (health says why)."""
    trigger = tmp_path / "fail-now"
    monkeypatch.setenv("AFDSERVE_TEST_FAIL", str(trigger))
    srv = _launch(tmp_path, entry=("-c", _FAILING_SERVE))
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 1000, "stream": True, "ignore_eos": True}
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", f"{srv.url}/v1/completions", json=body, headers=auth) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = 0
                while got < 2:
                    got += next(lines).startswith("data: ")
                trigger.touch()                                      # the next engine step raises
                tail = [ln for ln in lines if ln.startswith("data: ")]
            assert tail[-1] == "data: [DONE]", tail[-3:]
            err = json.loads(tail[-2][6:])["error"]
            assert err["type"] == "server_error" and "injected engine failure" in err["message"], err
            assert all("choices" in json.loads(ln[6:]) for ln in tail[:-2])   # tokens, then the error
            assert srv.proc.poll() is None, srv.log()                         # still up
            health = c.get(f"{srv.url}/health")
            assert health.status_code == 503 and "injected engine failure" in health.text
            assert c.get(f"{srv.url}/v1/models", headers=auth).status_code == 200
            again = c.post(f"{srv.url}/v1/completions", headers=auth, json={"model": MODEL, "prompt": "hi"})
            assert again.status_code == 503 and again.json()["error"]["type"] == "server_error"
    finally:
        _stop(srv.proc)


# `afdserve serve` whose engine steps take at least AFDSERVE_TEST_STEP_S seconds each, so that a
# stream is surely still running when the shutdown grace ends, however fast the decode is.
_SLOW_SERVE = _serve_with_step("""def patched_step(self):
    time.sleep(float(os.environ["AFDSERVE_TEST_STEP_S"]))
    return step(self)""")


def test_sigterm_shuts_down_cleanly(tmp_path, monkeypatch):
    """SIGTERM with a stream in flight (900 tokens at >= 5 ms a step: longer than the 1 s grace):
    the stream ends with the shutdown error and [DONE], and the process exits with 0."""
    monkeypatch.setenv("AFDSERVE_TEST_STEP_S", "0.005")
    server = _launch(tmp_path, entry=("-c", _SLOW_SERVE))
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", f"{server.url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data: "):
                    pass
                t0 = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                rest, broken = [], None
                try:
                    for line in lines:
                        rest.append(line)
                except httpx.HTTPError as exc:      # kept apart: the stream must still have ended cleanly
                    broken = exc
        code = server.proc.wait(15)
        assert code == 0, server.log()
        assert time.monotonic() - t0 < 10
        tail = [ln for ln in rest if ln.startswith("data: ")]
        assert tail and tail[-1] == "data: [DONE]", f"no [DONE] (connection error: {broken!r}); last lines {rest[-3:]}"
        assert "shutting down" in json.loads(tail[-2][6:])["error"]["message"]
        assert "stopped" in server.log()
    finally:
        _stop(server.proc)

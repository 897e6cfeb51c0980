"""`afdserve serve` as a real process, driven with the official `openai` client.

One server for the module (started with --api-key); the last test stops it with SIGTERM.
"""
from __future__ import annotations

import json
import os
import re
import signal
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server_e2e")
    ckpt = make_text_checkpoint(tmp / "model")
    port = free_port()
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "afdserve", "serve", "--model", str(ckpt), "--port", str(port),
           "--served-model-name", MODEL, "--api-key", KEY, "--num-kv-blocks", "64", "--max-num-seqs", "16",
           "--no-access-log", "--log-level", "warning", "--shutdown-timeout", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server did not become healthy:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield Server(proc, url, log_path)
    finally:
        _stop(proc)


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
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 600, "ignore_eos": True}
    before = _aborted(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=0.5))
    _wait_all_free(server)
    assert _aborted(server) == before + 1


def _aborted(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    m = re.search(r'^afdserve_request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_sigterm_shuts_down_cleanly(server):
    """Runs last: SIGTERM with a stream in flight; the stream ends and the process exits with 0."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            try:
                rest = list(lines)
            except httpx.HTTPError:
                rest = []   # the connection was closed mid-stream: also an end
    code = server.proc.wait(15)
    assert code == 0, server.log()
    assert time.monotonic() - t0 < 10
    tail = [ln for ln in rest if ln.startswith("data: ")]
    assert tail[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(tail[-2][6:])["error"]["message"]
    assert "stopped" in server.log()

"""Property-based fuzzing of the HTTP API, generated from the server's own /openapi.json.

schemathesis turns the OpenAPI document into hypothesis strategies: requests that fit the schema
(positive) and requests that break it (negative: wrong types, missing fields, out-of-range
values, unknown fields). Each goes to the FastAPI app in-process (ASGI) on a tiny random model.
Every answer must come within a time limit and be a 2xx, or a 4xx with an OpenAI-style error
body; never a 5xx, and no error event inside a 200 stream. Afterwards the server must be healthy,
idle (nothing left running) and still answer a good request. Examples are derandomized and
bounded so the test takes seconds on 2 cores.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from conftest_server import make_text_checkpoint  # noqa: E402

MODEL = "tiny-fuzz"
CALL_TIMEOUT_S = 30.0
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 40}
# Generation cost caps applied to generated bodies (validation is what is fuzzed, not throughput).
CAPS = {"n": 2, "best_of": 2, "max_tokens": 3, "max_completion_tokens": 3, "min_tokens": 3}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from afdserve.engine.engine import EngineArgs, LLMEngine
    from afdserve.server.api import build_app
    from afdserve.server.async_engine import AsyncEngine

    ckpt = make_text_checkpoint(tmp_path_factory.mktemp("server_fuzz"))
    engine = AsyncEngine(LLMEngine(EngineArgs(model=ckpt, num_kv_blocks=64, max_model_len=48, max_num_seqs=8)))
    try:
        yield build_app(engine, MODEL, None, 64 * 1024)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        yield ex


def _capped(body):
    """Bound what a generated body may cost: few choices, few tokens, few prompts."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key, cap in CAPS.items():
        if type(body.get(key)) is int and body[key] > cap:
            body[key] = cap
    if isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:2]
    return body


def _check_answer(case, response) -> None:
    where = f"{case.method} {case.path} body={json.dumps(case.body, default=str)[:400]}"
    status = response.status_code
    assert status < 500, f"{where} -> {status} {response.text[:400]}"
    if status >= 400:
        err = response.json().get("error")
        assert isinstance(err, dict) and err.get("message") and err.get("type"), f"{where} -> {response.text[:400]}"
    elif "text/event-stream" in str(response.headers.get("content-type")):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"{where}: stream not terminated"
        errors = [e for e in events[:-1] if "error" in json.loads(e)]
        assert not errors, f"{where}: error event in a 200 stream: {errors[0][:400]}"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_fuzz_api_from_openapi(schema, pool, mode):
    calls = {"n": 0}

    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        if case.body is not None and not isinstance(case.body, (bytes, str)):
            case.body = _capped(case.body)
        future = pool.submit(case.call)
        try:
            response = future.result(timeout=CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"no answer within {CALL_TIMEOUT_S}s: {case.method} {case.path} {case.body!r:.400}")
        calls["n"] += 1
        _check_answer(case, response)
        if mode == GenerationMode.NEGATIVE and case.method == "POST":
            # The body breaks the schema, so the server must refuse it (the old server accepted
            # e.g. a message without content).
            assert 400 <= response.status_code < 500, f"accepted a body that breaks the schema: {case.body!r:.400}"

    fuzz()
    assert calls["n"] >= EXAMPLES[mode] // 2   # the strategies produced real requests
    _assert_healthy_and_idle(schema.app)


def _assert_healthy_and_idle(app) -> None:
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    engine = app.state.server.engine.engine
    deadline = time.monotonic() + 10.0
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests(), "requests left running after their clients were answered"

"""The HTTP API in-process (FastAPI TestClient / httpx ASGI transport) on a tiny random model."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest_server import make_text_checkpoint

MODEL = "tiny-test"
KEY = "sekret"
MAX_BODY = 64 * 1024
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def async_engine(tmp_path_factory):
    from afdserve.engine.engine import EngineArgs, LLMEngine
    from afdserve.server.async_engine import AsyncEngine

    ckpt = make_text_checkpoint(tmp_path_factory.mktemp("server_api"))
    engine = AsyncEngine(LLMEngine(EngineArgs(model=ckpt, num_kv_blocks=64, max_model_len=96, max_num_seqs=16)))
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def app(async_engine):
    from afdserve.server.api import build_app
    return build_app(async_engine, MODEL, None, MAX_BODY)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def _complete(client, **body):
    r = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 5, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _sse(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _assert_alive(client):
    """After a bad request, a good one still works."""
    out = _complete(client, prompt="hello world", **GREEDY)
    assert out["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------ happy paths
def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()
    assert [m["id"] for m in data["data"]] == [MODEL]


def test_completion_text_and_usage(client):
    out = _complete(client, prompt="hello world the", **GREEDY)
    assert out["object"] == "text_completion" and out["model"] == MODEL
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "length" and len(choice["text"].split()) == 5
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_prompt_forms(client):
    by_text = _complete(client, prompt="hello world", **GREEDY)["choices"][0]["text"]
    ids = [103, 104]   # "hello world" in the test vocabulary
    assert _complete(client, prompt=ids, **GREEDY)["choices"][0]["text"] == by_text
    batch = _complete(client, prompt=["hello world", "the a"], **GREEDY)
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["choices"][0]["text"] == by_text
    assert batch["usage"]["prompt_tokens"] == 4
    batch_ids = _complete(client, prompt=[ids, [5, 6, 7]], **GREEDY)
    assert batch_ids["choices"][0]["text"] == by_text and len(batch_ids["choices"]) == 2


def test_n_and_seed(client):
    out = _complete(client, prompt=["hello", "world"], n=3, temperature=1.0, seed=7)
    assert sorted(c["index"] for c in out["choices"]) == list(range(6))
    again = _complete(client, prompt=["hello", "world"], n=3, temperature=1.0, seed=7)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in out["choices"]]


def test_stop_string(client):
    full = _complete(client, prompt="hello world", max_tokens=8, **GREEDY)["choices"][0]["text"]
    words = full.split()
    stop = " " + words[3]
    cut = _complete(client, prompt="hello world", max_tokens=8, stop=[stop], **GREEDY)["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[:full.find(stop)]
    streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello world", "max_tokens": 8,
                                                    "stop": stop, "stream": True, **GREEDY})
    chunks = _sse(streamed.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_logprobs(client):
    out = _complete(client, prompt="hello world", logprobs=3, **GREEDY)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and val <= 0
        assert max(top.values()) == pytest.approx(val)   # greedy: the chosen token is the top one
        assert top[tok] == pytest.approx(val)
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_chat(client):
    body = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "hello world"}],
            "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2, **GREEDY}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"].split()) == 4
    assert len(choice["logprobs"]["content"]) == 4
    assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])
    # The template renders "system says be brief . user says hello world . assistant says".
    assert out["usage"]["prompt_tokens"] == 12
    stream = client.post("/v1/chat/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    chunks = _sse(stream.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]
    assert chunks[-1]["usage"] == out["usage"] and chunks[-1]["choices"] == []
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"


def test_streaming_completion_n(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["hello", "world"], "n": 2,
                                             "max_tokens": 4, "stream": True, **GREEDY})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    texts: dict[int, str] = {}
    finished = set()
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
            if ch["finish_reason"]:
                finished.add(ch["index"])
    assert finished == {0, 1, 2, 3}
    whole = _complete(client, prompt=["hello", "world"], n=2, max_tokens=4, **GREEDY)
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}


def test_metrics(client, async_engine):
    import time
    _complete(client, prompt="hello", max_tokens=12, **GREEDY)
    graphs = async_engine.engine.executor.runner.graphs
    deadline = time.monotonic() + 10           # the idle engine publishes its stats after its last step
    while async_engine.stats().decode_graph_replays_total != graphs.replays and time.monotonic() < deadline:
        time.sleep(0.01)
    text = client.get("/metrics").text
    for name in ("afdserve_time_to_first_token_seconds_bucket", "afdserve_time_per_output_token_seconds",
                 "afdserve_e2e_request_latency_seconds", "afdserve_num_requests_running",
                 "afdserve_kv_cache_usage_perc", "afdserve_generation_tokens_total",
                 'afdserve_request_success_total{finished_reason="length"', "afdserve_decode_graphs{",
                 "afdserve_decode_graph_replays_total{"):
        assert name in text, name
    import re
    assert graphs.replays > 0 or graphs.refused        # 12 tokens at batch 1: replayed, or refused with a reason
    replays = float(re.search(r"^afdserve_decode_graph_replays_total\{[^}]*\} (\S+)$", text, re.M).group(1))
    held = float(re.search(r"^afdserve_decode_graphs\{[^}]*\} (\S+)$", text, re.M).group(1))
    assert replays == graphs.replays and held == sum(g.validated for g in graphs.graphs.values())


# ----------------------------------------------------------------- error cases
@pytest.mark.parametrize("body, param", [
    ({"prompt": "hello", "temperature": -1}, "temperature"),
    ({"prompt": "hello", "n": 0}, "n"),
    ({"prompt": "hello", "top_p": 1.5}, "top_p"),
    ({"prompt": "hello", "temperature": 2.5}, "temperature"),
    ({"prompt": "hello", "n": 129}, "n"),
    ({"prompt": "hello", "n": True}, "n"),
    ({"prompt": "hello", "n": 1.5}, "n"),
    ({"prompt": "hello", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hello", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hello", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "hello", "logprobs": -1}, "logprobs"),
    ({"prompt": "hello", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hello", "stop": ""}, "stop"),
    ({"prompt": "hello", "stop": [1]}, "stop"),
    ({"prompt": "hello", "seed": 2**64}, "seed"),
    ({"prompt": "hello", "min_p": 1.5}, "min_p"),
    ({"prompt": "hello", "top_k": -2}, "top_k"),
    ({"prompt": "hello", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"prompt": "hello", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hello", "stream": "yes"}, "stream"),
    ({"prompt": "hello", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hello", "stream": True, "stream_options": {"bogus": 1}}, "stream_options"),
    ({"prompt": "hello", "user": 5}, "user"),
    ({"prompt": "hello", "best_of": 21}, "best_of"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [-1, 2]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "hello", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hello", "logprobs": 50}, "logprobs"),
    ({"prompt": "hello", "echo": True}, "echo"),
    ({"prompt": "hello", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"prompt": "hello", "best_of": 3}, "best_of"),
    ({"prompt": "hello", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "hello", "temperature": "hot"}, "temperature"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": " ".join(["hello"] * 200)}, "prompt"),
    ({}, "prompt"),
])
def test_bad_completion_requests(client, body, param):
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    _assert_alive(client)


def test_too_long_prompt_message(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": list(range(5, 105))})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "context" in r.json()["error"]["message"]


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", "at least 1"),
    ({}, "messages", "required"),
    ({"messages": "hi"}, "messages", "list"),
    ({"messages": ["hi"]}, "messages", "object"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "'wizard'"),
    ({"messages": [{"content": "hi"}]}, "messages", "role"),
    ({"messages": [{"role": "user"}]}, "messages", "content: Field required"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "content must be"),
    ({"messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}, "messages", "required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "content must be"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages", "content must be"),
    ({"messages": [{"role": "user", "content": []}]}, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, "messages", "'video'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages", "text: Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages", "string"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages", "content must be"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "not supported"),
    ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages", "colour"),
    ({"messages": [{"role": "assistant"}]}, "messages", "needs content"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages", "needs content"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "function", "content": "42"}]}, "messages", "name"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens", "1"),
    ({"messages": HI, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"messages": HI, "tools": []}, "tools", "at least 1"),
    ({"messages": HI, "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"messages": HI, "response_format": {"type": "json_object"}}, "response_format", "text"),
    ({"messages": HI, "response_format": {}}, "response_format", "type"),
    ({"messages": HI, "temperature": float("nan")}, "temperature", "finite"),   # NaN: not in JSON proper
])
def test_bad_chat_requests(client, body, param, words):
    r = client.post("/v1/chat/completions", content=json.dumps({"model": MODEL, **body}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err
    _assert_alive(client)


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": [{"type": "text", "text": "be terse"}]}, {"role": "user", "content": "hi"}],
    [{"role": "developer", "content": "be terse", "name": "ops"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]}],
    [{"role": "user", "content": "what is the time"},
     {"role": "assistant", "content": None,
      "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "ten"},
     {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
     {"role": "user", "content": "hi", "name": "bob"}],
    [{"role": "function", "name": "clock", "content": None}, {"role": "user", "content": "hi"}],
])
def test_chat_message_forms_openai_accepts(client, messages):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                  "n": None, "stream": None, "logprobs": None, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_template_messages_keep_what_templates_read():
    """Validated messages -> template input: content as a string, and name / tool_calls /
    tool_call_id passed through where present (HF templates render tool calls from these)."""
    from afdserve.server.chat import render_chat, template_messages
    from afdserve.server.protocol import ChatCompletionRequest

    call = {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "time"}, {"type": "text", "text": "?"}], "name": "bo"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ten"}]})
    messages = template_messages(req.messages)
    assert messages == [{"role": "user", "content": "time?", "name": "bo"},
                        {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "content": "ten", "tool_call_id": "c1"}]
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}<{{ c.function.name }}>{% endfor %}|{% endfor %}")
    assert render_chat(messages, template) == "user:time?|assistant:<clock>|tool:ten|"


def test_chat_parts_render_as_the_joined_string(client):
    """A list of text parts is the same prompt as their concatenation (usage counts its tokens)."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "hello world"}]
    outs = [client.post("/v1/chat/completions", json={"messages": m, "max_tokens": 4, **GREEDY}).json()
            for m in (parts, joined)]
    assert outs[0]["choices"][0]["message"] == outs[1]["choices"][0]["message"]
    assert outs[0]["usage"] == outs[1]["usage"]


def test_top_p_zero_is_greedy(client):
    """OpenAI accepts top_p 0: only the most likely token survives, so sampling equals greedy."""
    greedy = _complete(client, prompt="hello world", max_tokens=6, **GREEDY)["choices"][0]["text"]
    top0 = _complete(client, prompt="hello world", max_tokens=6, temperature=1.0, top_p=0, seed=3,
                     ignore_eos=True)["choices"][0]["text"]
    assert top0 == greedy


def test_openapi_document_describes_request_bodies(client):
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert "messages" in chat["required"] and chat["additionalProperties"] is False
    assert chat["properties"]["model"]["anyOf"][0] == {"enum": [MODEL]}
    assert chat["properties"]["messages"]["minItems"] == 1
    assert "400" in doc["paths"]["/v1/completions"]["post"]["responses"]


def test_unknown_model_404(client):
    for path, extra in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = client.post(path, json={"model": "gpt-17", **extra})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    _assert_alive(client)


def test_raw_body_errors(client):
    headers = {"content-type": "application/json"}
    cases = [(b'{"model": "tiny-test", "prompt": "hi"', 400),                 # malformed JSON
             (b'{"prompt": "\xff\xfe hi"}', 400),                            # not UTF-8
             (b'[1, 2]', 400),                                               # not an object
             (b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}', 413)]        # too large
    for raw, status in cases:
        r = client.post("/v1/completions", content=raw, headers=headers)
        assert r.status_code == status, (raw[:40], r.text)
        assert r.json()["error"]["message"]
        _assert_alive(client)
    # Too large without a Content-Length header (chunked upload).
    r = client.post("/v1/completions", content=iter([b"{" + b" " * MAX_BODY, b"}"]), headers=headers)
    assert r.status_code == 413
    _assert_alive(client)


def test_api_key(async_engine):
    from afdserve.server.api import build_app

    with TestClient(build_app(async_engine, MODEL, KEY, MAX_BODY)) as c:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        assert c.post("/v1/completions", json=body).status_code == 401
        r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --------------------------------------------------------------- batching
def test_concurrent_greedy_equals_sequential(app):
    prompts = ["hello world", "the a of", "you that he was", "water than call", "w1 w2 w3", "first who"]

    async def one(c, p):
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 8,
                                                  "logprobs": 0, **GREEDY})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["tokens"]

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            sequential = [await one(c, p) for p in prompts]
            concurrent = await asyncio.gather(*(one(c, p) for p in prompts))
        return sequential, concurrent

    sequential, concurrent = asyncio.run(main())
    assert concurrent == sequential


def test_engine_failure_marks_unhealthy_and_fails_requests(tmp_path):
    """An exception in the step loop fails the request with a message; /health turns 503."""
    from afdserve.engine.engine import EngineArgs, LLMEngine
    from afdserve.server.api import build_app
    from afdserve.server.async_engine import AsyncEngine
    from afdserve.config import get_preset
    from afdserve.model.checkpoint import init_checkpoint

    ckpt = init_checkpoint(get_preset("tiny"), tmp_path / "m", seed=0)
    engine = LLMEngine(EngineArgs(model=ckpt, num_kv_blocks=8))

    def broken_step():
        raise RuntimeError("boom")

    engine.step = broken_step
    ae = AsyncEngine(engine)
    try:
        with TestClient(build_app(ae, MODEL, None, MAX_BODY)) as c:
            r = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 3})
            assert r.status_code == 503 and "boom" in r.json()["error"]["message"]
            assert c.get("/health").status_code == 503
            r = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 3, "stream": True})
            assert r.status_code == 503
    finally:
        ae.shutdown()


def test_metrics_expose_afd_pipeline_summary():
    from afdserve.server.metrics import ServerMetrics

    text = ServerMetrics("m").render(None, {"afd_step_ms": 12.5, "afd_bubble_fraction": 0.25}).decode()
    assert 'afdserve_afd_pipeline{model_name="m",quantity="step_ms"} 12.5' in text
    assert 'quantity="bubble_fraction"} 0.25' in text

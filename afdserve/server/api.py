"""The OpenAI-compatible HTTP API: routes over an `AsyncEngine`.

`build_app(async_engine, served_model_name, api_key, max_body_bytes)` returns a FastAPI app.
Every error is OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}` with a 4xx
(client) or 5xx (engine) status. A request that fails never affects the others.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from afdserve.engine.engine import EngineDeadError, RequestOutput
from afdserve.sampling import Sample
from afdserve.server import dashboard
from afdserve.server import protocol as P
from afdserve.server.async_engine import AsyncEngine, EngineStoppedError, RequestStream
from afdserve.server.chat import ChatTemplateError, render_chat, template_messages
from afdserve.server.metrics import CONTENT_TYPE, ServerMetrics

DEFAULT_MAX_BODY_BYTES = 1 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _engine_error(exc: Exception) -> APIError:
    """Errors from AsyncEngine.add_request / a stream -> the HTTP answer."""
    if isinstance(exc, (EngineDeadError, EngineStoppedError)):
        return APIError(503, str(exc), "server_error", code="engine_unavailable")
    if isinstance(exc, ValueError):   # LLMEngine.add_request only rejects prompts
        message = str(exc)
        code = "context_length_exceeded" if "context" in message else None
        return APIError(400, message, param="prompt", code=code)
    return APIError(500, f"{type(exc).__name__}: {exc}", "server_error")


# -------------------------------------------------------------- request parsing
async def _read_json(request: Request, max_bytes: int) -> dict:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


def _validate(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        param = loc[0] if loc else None
        raise APIError(400, f"{'.'.join(loc)}: {err['msg']}" if loc else err["msg"], param=param) from None


def _sampling(req, default_max_tokens: int):
    try:
        return req.sampling_params(default_max_tokens)
    except ValueError as exc:   # SamplingParams' messages start with the parameter's name
        message = str(exc)
        raise APIError(400, message, param=message.split()[0]) from None


# ------------------------------------------------------------------ app state
@dataclass
class _Server:
    engine: AsyncEngine
    model_name: str
    api_key: str | None
    max_body_bytes: int
    metrics: ServerMetrics

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.api_key):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def token_str(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        return tok.token_str(token_id) if tok is not None else f"token_id:{token_id}"


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    metrics = ServerMetrics(served_model_name)
    async_engine.on_output = metrics.on_output
    async_engine.on_abort = metrics.on_abort
    srv = _Server(async_engine, served_model_name, api_key, max_body_bytes, metrics)
    app = FastAPI(title="afdserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: P.openapi_document(app, served_model_name)
    app.state.server = srv
    dashboard.install(app, async_engine)   # /dashboard and /dashboard/data
    _add_error_handlers(app, metrics)
    _add_status_routes(app, srv, metrics)
    _add_generation_routes(app, srv)
    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.on_http_error(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                       else "server_error")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        metrics.on_http_error(500)
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(err.body(), status_code=500)


def _add_status_routes(app: FastAPI, srv: _Server, metrics: ServerMetrics) -> None:
    async_engine = srv.engine

    @app.get("/health")
    async def health():
        problem = async_engine.health()
        if problem:
            return JSONResponse(APIError(503, problem, "server_error", code="engine_unhealthy").body(), 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(async_engine.stats(), async_engine.afd_trace_summary(),
                                       async_engine.afd_recovery()),
                        media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        card = P.ModelCard(id=srv.model_name, max_model_len=async_engine.max_model_len)
        return P.ModelList(data=[card]).model_dump()


def _add_generation_routes(app: FastAPI, srv: _Server) -> None:
    async_engine = srv.engine

    async def parse(request: Request, model_cls):
        """Auth, body, schema, model name and supported options: the common gate of both routes."""
        srv.check_auth(request)
        req = _validate(model_cls, await _read_json(request, srv.max_body_bytes))
        srv.check_model(req.model)
        _check_supported(req)
        return req

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, P.CompletionRequest)
        params = _sampling(req, 16)
        try:
            prompts = req.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        return await _serve(srv, request, req, "cmpl", prompts, params, _CompletionFormat(srv, req))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, P.ChatCompletionRequest)
        params = _sampling(req, async_engine.max_model_len)
        prompt = _chat_prompt(srv, req)
        return await _serve(srv, request, req, "chatcmpl", [prompt], params, _ChatFormat(srv, req))


def _check_supported(req) -> None:
    problem = req.unsupported()
    if problem:
        raise APIError(400, problem[1], param=problem[0], code="unsupported_parameter")


def _chat_prompt(srv: _Server, req: P.ChatCompletionRequest) -> str:
    tok = srv.engine.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so chat is unavailable; use /v1/completions "
                       "with token ids")
    try:
        messages = template_messages(req.messages)
        return render_chat(messages, tok.chat_template, tok.bos_token, tok.eos_token, req.add_generation_prompt)
    except (ChatTemplateError, ValueError, AttributeError) as exc:
        raise APIError(400, str(exc), param="messages") from None


# ------------------------------------------------------------------ generation
async def _serve(srv: _Server, request: Request, req, prefix: str, prompts: list, params, fmt):
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    streams = await _add_all(srv.engine, request_id, prompts, params)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _sse(fmt, request_id, streams, params, include_usage)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    outputs = await _collect_or_disconnect(request, streams)
    if outputs is None:   # the client went away; nobody reads this
        return Response(status_code=499)
    return fmt.response(request_id, outputs).model_dump()


async def _add_all(engine: AsyncEngine, request_id: str, prompts: list, params) -> list[RequestStream]:
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            streams.append(await engine.add_request(f"{request_id}-{i}", prompt, params))
    except Exception as exc:
        for s in streams:
            s.abort()
        err = _engine_error(exc)
        if len(prompts) > 1 and err.status == 400:
            err.message = f"prompt {len(streams)}: {err.message}"
        raise err from None
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def _final(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last.error:
        raise EngineDeadError(last.error)
    return last


async def _collect_or_disconnect(request: Request, streams: list[RequestStream]) -> list[RequestOutput] | None:
    """Final outputs in prompt order, or None when the client disconnected first (requests aborted)."""
    collect = asyncio.ensure_future(asyncio.gather(*(_final(s) for s in streams)))
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        if collect in done:
            return collect.result()
        return None
    except (EngineDeadError, EngineStoppedError) as exc:
        raise _engine_error(exc) from None
    finally:
        watch.cancel()
        collect.cancel()
        for s in streams:
            s.abort()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come: (prompt index, output)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


@dataclass
class _ChoiceState:
    """What one streamed choice has sent so far."""

    text: str = ""
    tokens: int = 0
    offset: int = 0
    done: bool = False


async def _sse(fmt, request_id: str, streams: list[RequestStream], params, include_usage: bool):
    n = params.n
    states: dict[int, _ChoiceState] = {}
    prompt_tokens: dict[int, int] = {}
    try:
        for chunk in fmt.stream_start(request_id, len(streams) * n):
            yield _sse_line(chunk)
        async for i, out in _merge(streams):
            if out.error:
                raise EngineDeadError(out.error)
            prompt_tokens[i] = len(out.prompt_token_ids)
            for c in out.outputs:
                idx = i * n + c.index
                st = states.setdefault(idx, _ChoiceState())
                if st.done:
                    continue
                finished = c.finish_reason is not None
                # The engine's detokenizer holds back what may still become a stop string.
                text = c.text
                delta = text[len(st.text):] if text.startswith(st.text) else ""
                new_samples = (c.logprobs or [])[st.tokens:] if c.logprobs is not None else None
                # Without a tokenizer there is no text: one (empty) chunk per token shows progress.
                progress = fmt.srv.engine.tokenizer is None and len(c.token_ids) > st.tokens
                if delta or new_samples or finished or progress:
                    yield _sse_line(fmt.chunk(request_id, idx, delta, new_samples, st,
                                              c.finish_reason if finished else None))
                if delta:
                    st.text = text
                st.tokens = len(c.token_ids)
                st.done = finished
        if include_usage:
            completion = sum(s.tokens for s in states.values())
            usage = P.Usage(prompt_tokens=sum(prompt_tokens.values()), completion_tokens=completion,
                            total_tokens=sum(prompt_tokens.values()) + completion)
            yield _sse_line(fmt.usage_chunk(request_id, usage))
    except (EngineDeadError, EngineStoppedError, ValueError) as exc:
        yield _sse_line(_engine_error(exc).body())
    finally:
        for s in streams:
            s.abort()
    yield "data: [DONE]\n\n"


def _sse_line(obj) -> str:
    if isinstance(obj, BaseModel):
        data = obj.model_dump()
        if data.get("usage") is None:
            data.pop("usage", None)
    else:
        data = obj
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(outputs: list[RequestOutput]) -> P.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ------------------------------------------------------------- response shapes
@dataclass
class _CompletionFormat:
    srv: _Server
    req: P.CompletionRequest

    def logprobs(self, samples: list[Sample] | None, offset: int) -> P.CompletionLogprobs | None:
        if samples is None:
            return None
        lp = P.CompletionLogprobs()
        for s in samples:
            tok = self.srv.token_str(s.token_id)
            lp.tokens.append(tok)
            lp.token_logprobs.append(s.logprob)
            lp.top_logprobs.append({self.srv.token_str(t): v for t, v in s.top_logprobs}
                                   if s.top_logprobs else None)
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    def response(self, request_id: str, outputs: list[RequestOutput]) -> P.CompletionResponse:
        n = self.req.n
        choices = [P.CompletionChoice(index=i * n + c.index, text=c.text, logprobs=self.logprobs(c.logprobs, 0),
                                      finish_reason=c.finish_reason)
                   for i, o in enumerate(outputs) for c in o.outputs]
        return P.CompletionResponse(id=request_id, model=self.srv.model_name, choices=choices,
                                    usage=_usage(outputs))

    def stream_start(self, request_id: str, num_choices: int) -> list:
        return []

    def chunk(self, request_id, idx, delta, samples, st: _ChoiceState, finish_reason):
        lp = self.logprobs(samples, st.offset)
        if lp is not None:
            st.offset += sum(len(t) for t in lp.tokens)
        choice = P.CompletionChoice(index=idx, text=delta, logprobs=lp, finish_reason=finish_reason)
        return P.CompletionResponse(id=request_id, model=self.srv.model_name, choices=[choice])

    def usage_chunk(self, request_id: str, usage: P.Usage):
        return P.CompletionResponse(id=request_id, model=self.srv.model_name, choices=[], usage=usage)


@dataclass
class _ChatFormat:
    srv: _Server
    req: P.ChatCompletionRequest

    def logprobs(self, samples: list[Sample] | None) -> P.ChatLogprobs | None:
        if samples is None:
            return None
        content = []
        for s in samples:
            tok = self.srv.token_str(s.token_id)
            tops = [P.TopLogprob(token=(t := self.srv.token_str(i)), logprob=v, bytes=list(t.encode()))
                    for i, v in (s.top_logprobs or [])]
            content.append(P.TokenLogprob(token=tok, logprob=s.logprob, bytes=list(tok.encode()), top_logprobs=tops))
        return P.ChatLogprobs(content=content)

    def response(self, request_id: str, outputs: list[RequestOutput]) -> P.ChatCompletionResponse:
        choices = [P.ChatChoice(index=c.index, message=P.AssistantMessage(content=c.text),
                                logprobs=self.logprobs(c.logprobs), finish_reason=c.finish_reason)
                   for o in outputs for c in o.outputs]
        return P.ChatCompletionResponse(id=request_id, model=self.srv.model_name, choices=choices,
                                        usage=_usage(outputs))

    def _chunk(self, request_id, choices, usage=None):
        return P.ChatCompletionChunk(id=request_id, model=self.srv.model_name, choices=choices, usage=usage)

    def stream_start(self, request_id: str, num_choices: int) -> list:
        return [self._chunk(request_id, [P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant",
                                                                                          content=""))])
                for i in range(num_choices)]

    def chunk(self, request_id, idx, delta, samples, st: _ChoiceState, finish_reason):
        delta_msg = P.DeltaMessage(content=delta) if delta else P.DeltaMessage()
        choice = P.ChatChunkChoice(index=idx, delta=delta_msg, logprobs=self.logprobs(samples),
                                   finish_reason=finish_reason)
        return self._chunk(request_id, [choice])

    def usage_chunk(self, request_id: str, usage: P.Usage):
        return self._chunk(request_id, [], usage)

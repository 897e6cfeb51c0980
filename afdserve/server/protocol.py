"""OpenAI-compatible request and response models (pydantic), and the server's OpenAPI document.

Requests are checked as the OpenAI API checks them, and anything else is a 400, never silently
ignored or coerced: unknown fields, wrong JSON types ("0.5" is not a number, true is not an
integer), NaN/Infinity, out-of-range values, empty `messages`, unknown roles, messages without
the content their role needs, unknown content part types. Parameters OpenAI marks nullable accept
null (the default then applies). Supported extras beyond OpenAI: top_k, min_p, min_tokens,
ignore_eos, stop_token_ids, add_generation_prompt.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator
from pydantic_core import PydanticCustomError

from afdserve.sampling import SamplingParams


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class _Request(BaseModel):
    """A request object: strict JSON types, finite numbers, no unknown fields; null means the default."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _null_is_default(self):
        for name, f in type(self).model_fields.items():
            if getattr(self, name) is None and not f.is_required() and f.default is not None:
                object.__setattr__(self, name, f.default)
        return self


def _range(kind: type, lo=None, hi=None):
    """`kind` within [lo, hi] (in the JSON schema too)."""
    return Annotated[kind, Field(ge=lo, le=hi)]


_TYPE_MISMATCH = frozenset({"string_type", "list_type", "int_type", "float_type", "bool_type", "dict_type",
                            "model_type", "none_required", "literal_error", "union_tag_invalid"})


def _where(error) -> str:
    """'item 0, text: ' for an error inside a union member; the member's label and tag are left out."""
    member, *loc = error["loc"]
    if "tagged-union[" in str(member) and len(loc) > 1:
        loc = loc[:1] + loc[2:]    # (index, tag, field...) -> (index, field...)
    parts = [f"item {p}" if isinstance(p, int) else p for p in loc]
    return f"{', '.join(parts)}: " if parts else ""


def _one_of(expected: str):
    """A union's errors as one message: what is expected, plus the first error that is more than
    'not this type' (a wrong tag, a missing or out-of-range field), with the item it is in."""

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError as exc:
            errors = exc.errors()
            specific = [e for e in errors if e["type"] not in _TYPE_MISMATCH or len(e["loc"]) > 2] or \
                [e for e in errors if e["type"] == "union_tag_invalid"]
            detail = f" ({_where(specific[0])}{specific[0]['msg']})" if specific else ""
            raise PydanticCustomError("invalid_union", "{expected}{detail}",
                                      {"expected": expected, "detail": detail}) from None

    return WrapValidator(check)


Count = _range(int, 1, 128)                # n
Penalty = _range(float, -2, 2)
TopLogprobs = _range(int, 0, 20)
PositiveInt = _range(int, 1)
TokenId = _range(int, 0)
Seed = _range(int, -2**63, 2**63 - 1)
StopString = Annotated[str, Field(min_length=1)]


class StreamOptions(_Request):
    include_usage: bool | None = None


class _SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: Count | None = 1
    temperature: _range(float, 0, 2) | None = None
    top_p: _range(float, 0, 1) | None = None
    stop: Annotated[Union[StopString, Annotated[list[StopString], Field(max_length=4)]],
                    _one_of("stop must be a non-empty string or a list of at most 4 of them")] | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, _range(float, -100, 100)] | None = None
    user: str | None = None
    # Extras (vLLM names).
    top_k: _range(int, -1) | None = 0
    min_p: _range(float, 0, 1) | None = 0.0
    min_tokens: _range(int, 0) | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[TokenId] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a parameter this server does not implement, else None."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream: true"
        return None

    def _sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises ValueError with SamplingParams' message for values that conflict."""
        top_p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=top_p or 1e-9,   # OpenAI's top_p 0: only the most likely token survives
            top_k=self.top_k, min_p=self.min_p, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, logprobs=logprobs)


_TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Annotated[Union[str, Annotated[list[str], Field(min_length=1)], _TokenIds,
                         Annotated[list[_TokenIds], Field(min_length=1)]],
                   _one_of("prompt must be a string, or a non-empty list of strings, of token ids (integers >= 0) "
                           "or of non-empty lists of token ids")]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: PositiveInt | None = 16
    logprobs: TopLogprobs | None = None
    echo: bool | None = False
    best_of: _range(int, 0, 20) | None = None
    suffix: str | None = None

    def unsupported(self):
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of must equal n (beam search and best-of are not supported)"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt per entry (a string or token ids)."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return self._sampling(self.max_tokens if self.max_tokens is not None else default_max_tokens,
                              self.logprobs)


# ------------------------------------------------------------------ chat messages
class TextPart(_Request):
    type: Literal["text"]
    text: str


class RefusalPart(_Request):
    type: Literal["refusal"]
    refusal: str


class ImageURLPart(_Request):
    """Accepted by the schema, answered with 'not supported' (this server reads text only)."""

    type: Literal["image_url"]
    image_url: dict[str, Any]


class InputAudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Request):
    type: Literal["file"]
    file: dict[str, Any]


def _parts(*kinds: type) -> Any:
    part = Annotated[Union[kinds], Field(discriminator="type")] if len(kinds) > 1 else kinds[0]
    return Annotated[list[part], Field(min_length=1)]


TextContent = Annotated[Union[str, _parts(TextPart)],
                        _one_of("content must be a string or a non-empty list of text parts")]


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Request):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Request):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Request):
    role: Literal["user"]
    content: Annotated[Union[str, _parts(TextPart, ImageURLPart, InputAudioPart, FilePart)],
                       _one_of("content must be a string or a non-empty list of content parts "
                               "(text, image_url, input_audio, file)")]
    name: str | None = None


class AssistantMessageParam(_Request):
    role: Literal["assistant"]
    content: Annotated[Union[str, _parts(TextPart, RefusalPart), None],
                       _one_of("content must be null, a string or a non-empty list of text or refusal parts")] = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not self.tool_calls and self.function_call is None:
            raise ValueError("an assistant message needs content unless it has tool_calls or function_call")
        return self


class ToolMessage(_Request):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(_Request):
    """Deprecated by OpenAI, still accepted: content is required but may be null."""

    role: Literal["function"]
    content: str | None
    name: str


ChatMessage = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessageParam, ToolMessage,
                              FunctionMessage], Field(discriminator="role")]


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    add_generation_prompt: bool | None = True
    tools: Annotated[list[dict[str, Any]], Field(min_length=1)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def unsupported(self):
        if self.tools:
            return "tools", "tools are not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported (no tools)"
        if self.response_format and self.response_format.type != "text":
            return "response_format", "only response_format type 'text' is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs: true"
        return super().unsupported()

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(limit if limit is not None else default_max_tokens,
                              (self.top_logprobs or 0) if self.logprobs else None)


# ------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "afdserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------ OpenAPI
REQUEST_BODIES: dict[str, type[_Request]] = {"/v1/completions": CompletionRequest,
                                             "/v1/chat/completions": ChatCompletionRequest}
"""The routes that read a JSON body, and its model (the routes parse bodies themselves, so the
document is told here)."""


def openapi_document(app, served_model_name: str) -> dict:
    """The app's OpenAPI document with the request bodies, their 4xx errors, and `model` limited
    to the served name (served at /openapi.json; the fuzz test generates requests from it)."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = app.openapi_schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    refs, defs = models_json_schema([(m, "validation") for m in (*REQUEST_BODIES.values(), ErrorResponse)],
                                    ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs["$defs"])
    error = {"description": "OpenAI-style error", "content": {"application/json": {
        "schema": refs[(ErrorResponse, "validation")]}}}
    for path, model in REQUEST_BODIES.items():
        schemas[model.__name__]["properties"]["model"] = {"anyOf": [{"enum": [served_model_name]}, {"type": "null"}]}
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[(model, "validation")]}}}
        op["responses"].update({str(code): error for code in (400, 401, 404, 413)})
    return doc

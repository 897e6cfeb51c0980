"""Chat messages -> prompt text.

The checkpoint's `tokenizer_config.json` `chat_template` (a Jinja template, as in HF
transformers) is rendered in a sandboxed environment with `messages`, `add_generation_prompt`,
`bos_token` and `eos_token`. Without a template the documented plain fallback is used:

    system: You are terse.
    user: Hello
    assistant:
"""
from __future__ import annotations

from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template failed to render these messages (answered with 400)."""


def message_text(content) -> str:
    """A validated message's content (None, a string, or content parts) as text. Text and
    refusal parts are read; other parts (images, audio, files) are not supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type not in ("text", "refusal"):
            raise ValueError(f"content parts of type {part.type!r} are not supported; this model reads text only")
        texts.append(part.text if part.type == "text" else part.refusal)
    return "".join(texts)


def template_messages(messages) -> list[dict]:
    """Validated request messages -> what a chat template reads: `role`, `content` (a string), and
    `name`, `tool_call_id`, `tool_calls` where the message has them."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": message_text(m.content)}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(m, key, None)
            if value is not None:
                d[key] = [call.model_dump() for call in value] if key == "tool_calls" else value
        out.append(d)
    return out


def plain_prompt(messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@lru_cache(maxsize=8)
def _compile(template: str):
    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(messages: list[dict], template: str | None, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    """`messages`: [{"role", "content": str}] -> the prompt string."""
    if not template:
        return plain_prompt(messages)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token or "", eos_token=eos_token or "")
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from None
    except Exception as exc:  # sandbox violations and template bugs
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None

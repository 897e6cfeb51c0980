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
    """OpenAI content: a string, None, or a list of parts; only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ValueError(f"content parts of type {part.get('type')!r} are not supported; use text")
        texts.append(part.get("text", ""))
    return "".join(texts)


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

"""Chat messages to prompt text with the model's own Jinja template (``tokenizer.chat_template``).

Templates come from model files, i.e. from strangers, so they run in Jinja's immutable sandbox. A
model without a template, or with one that fails to render, falls back to a plain transcript so
that chat still works (the answer quality is then the model's problem, not an HTTP 500).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["FALLBACK_TEMPLATE", "TemplateError", "render_chat"]

log = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateError(ValueError):
    """The messages are not something a chat template can render (bad roles, bad content)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
_ENV.globals["raise_exception"] = _raise
_ENV.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
_CACHE: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    template = _CACHE.get(source)
    if template is None:
        template = _ENV.from_string(source)
        _CACHE[source] = template
    return template


def _content_text(content: Any) -> str:
    """OpenAI content may be a list of parts; the runtime is text-only, so join the text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise TemplateError("only text content parts are supported")
        return "".join(parts)
    raise TemplateError("message content must be a string or a list of text parts")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"messages[{index}].role must be a non-empty string")
        result.append({"role": role, "content": _content_text(message.get("content"))})
    return result


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages``; a template's own error (``raise_exception``) becomes a TemplateError."""
    normalized = normalize_messages(list(messages))
    values = {
        "messages": normalized,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    if template:
        try:
            return _compile(template).render(**values)
        except TemplateError:
            raise
        except jinja2.TemplateError as error:
            log.warning("the model's chat template failed (%s); using the fallback transcript", error)
    return _compile(FALLBACK_TEMPLATE).render(**values)

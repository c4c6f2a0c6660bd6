"""Chat messages to prompt text with the model's own Jinja template (``tokenizer.chat_template``).

Templates come from model files, i.e. from strangers, so they run in Jinja's immutable sandbox. A
model without a template, or with one that fails to render, falls back to a plain transcript so
that chat still works (the answer quality is then the model's problem, not an HTTP 500).

**Tools.** ``render_chat(..., tools=[...])`` hands the template ``tools`` the way Hugging Face's
``apply_chat_template`` does (``[{"type": "function", "function": {name, description, parameters}}]``)
and the messages keep what tool calling needs: an assistant turn's ``tool_calls`` with
``function.arguments`` as an object (OpenAI sends a JSON string; templates write it with ``tojson``,
so it is parsed, as llama-server does), a tool result's ``tool_call_id`` and ``name`` (Ollama's
``tool_name``). ``tojson`` is Hugging Face's (no HTML escaping), since that is what the templates are
written and tested against.

What a template does with tools is found by rendering probe conversations once per template and
looking for the probe's markers in the output (llama.cpp's template "caps" work the same way):

* a template that renders ``tools`` (Qwen, Hermes, Llama 3.x, Mistral...) gets them as they are;
* one that does not (the demo model's, the fallback transcript, older models) gets the tool
  descriptions in the system message in the Hermes/Qwen form (``<tools>`` JSON, "return calls as
  ``<tool_call>``"), the convention most open models were tuned on and the format the API's parser
  falls back to for such templates;
* a tool call or tool result the template would drop is written as text in the same form
  (``<tool_call>{...}</tool_call>``, ``<tool_response>...</tool_response>``), so no turn of the
  conversation is lost; a template that cannot render a ``tool`` turn gets the results as a user
  turn (consecutive results in one), which every template can render.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "FALLBACK_TEMPLATE",
    "TemplateCaps",
    "TemplateError",
    "hermes_tool_call",
    "normalize_messages",
    "render_chat",
    "template_caps",
]

log = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateError(ValueError):
    """The messages are not something a chat template can render (bad roles, bad content);
    ``param`` names the field at fault (``messages[2].tool_calls[0].function.arguments``)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: Jinja's own escapes ``<``, ``>`` and ``&`` for HTML."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.Undefined,
    extensions=[jinja2.ext.loopcontrols],  # as transformers: templates use {% break %}
)
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise
_ENV.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
_CACHE: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    template = _CACHE.get(source)
    if template is None:
        template = _ENV.from_string(source)
        _CACHE[source] = template
    return template


def _content_text(content: Any, where: str) -> str:
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
                raise TemplateError(f"{where}: only text content parts are supported", param=where)
        return "".join(parts)
    raise TemplateError(f"{where} must be a string or a list of text parts", param=where)


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A tool call's arguments as an object: OpenAI sends a JSON string, Ollama an object."""
    if value is None or value == "":  # a call without arguments, as some clients send it
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise TemplateError(f"{where} is not valid JSON: {error}", param=where) from None
    if not isinstance(value, dict):
        raise TemplateError(f"{where} must be a JSON object", param=where)
    return value


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise TemplateError(f"{where} must be a list", param=where)
    calls = []
    for index, call in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(call, Mapping):
            raise TemplateError(f"{at} must be an object", param=at)
        if call.get("type", "function") != "function":
            raise TemplateError(f'{at}.type must be "function"', param=f"{at}.type")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise TemplateError(f"{at}.function must be an object", param=f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise TemplateError(f"{at}.function.name must be a non-empty string", param=f"{at}.function.name")
        normalized: dict[str, Any] = {
            "type": "function",
            "function": {
                "name": name,
                "arguments": _arguments(function.get("arguments"), f"{at}.function.arguments"),
            },
        }
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise TemplateError(f"{at}.id must be a string", param=f"{at}.id")
            normalized["id"] = call["id"]
        calls.append(normalized)
    return calls


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain dicts with string content, tool calls' arguments as objects; only the keys a message
    has (templates test ``'tool_calls' in message``)."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list", param="messages")
    result = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise TemplateError(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"{where}.role must be a non-empty string", param=f"{where}.role")
        out: dict[str, Any] = {
            "role": role,
            "content": _content_text(message.get("content"), f"{where}.content"),
        }
        if message.get("tool_calls"):
            if role != "assistant":
                raise TemplateError(
                    f"{where}.tool_calls: only assistant messages carry tool calls",
                    param=f"{where}.tool_calls",
                )
            out["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        for key in ("tool_call_id", "name", "tool_name"):
            value = message.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise TemplateError(f"{where}.{key} must be a string", param=f"{where}.{key}")
            out[key] = value
        if role == "tool" and "tool_name" in out:
            out.setdefault("name", out["tool_name"])  # Ollama's field under Hugging Face's name
        result.append(out)
    return result


# ------------------------------------------------------------------ what a template does with tools

_PROBE_TOOL = "parallama_probe_tool"
_PROBE_ARGUMENT = "parallama_probe_argument"
_PROBE_RESULT = "parallama_probe_result"
_PROBE_SYSTEM = "parallama_probe_system"
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _PROBE_TOOL,
            "description": "probe",
            "parameters": {"type": "object", "properties": {_PROBE_ARGUMENT: {"type": "string"}}},
        },
    }
]
_PROBE_CALL_ID = "call00001"  # nine alphanumerics: Mistral's templates insist on it


@dataclass(frozen=True)
class TemplateCaps:
    """What a chat template renders (see the module docstring)."""

    tools: bool
    tool_calls: bool
    tool_role: bool
    system_role: bool


_CAPS: dict[str | None, TemplateCaps] = {}


def _probe(template: jinja2.Template, messages: list[dict[str, Any]], tools: Any = None) -> str:
    values: dict[str, Any] = {
        "messages": messages,
        "add_generation_prompt": True,
        "bos_token": "",
        "eos_token": "",
    }
    if tools is not None:
        values["tools"] = tools
    try:
        return template.render(**values)
    except Exception:  # any failure means "not supported"; the probe's input is ours
        return ""


def template_caps(template: str | None) -> TemplateCaps:
    """Found by rendering probe conversations (cached per template text)."""
    caps = _CAPS.get(template)
    if caps is not None:
        return caps
    try:
        compiled = _compile(template or FALLBACK_TEMPLATE)
    except jinja2.TemplateError:
        compiled = _compile(FALLBACK_TEMPLATE)
    user = {"role": "user", "content": "probe"}
    with_tools = _probe(compiled, [user], _PROBE_TOOLS)
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": _PROBE_CALL_ID,
                "type": "function",
                "function": {"name": _PROBE_TOOL, "arguments": {_PROBE_ARGUMENT: "x"}},
            }
        ],
    }
    result = {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": _PROBE_CALL_ID, "name": _PROBE_TOOL}
    after = [{"role": "assistant", "content": "done"}, {"role": "user", "content": "again"}]
    conversation = _probe(compiled, [user, call, result, *after], _PROBE_TOOLS)
    results_only = conversation or _probe(
        compiled, [user, {"role": "assistant", "content": "x"}, result, *after], _PROBE_TOOLS
    )
    system = _probe(compiled, [{"role": "system", "content": _PROBE_SYSTEM}, user])
    caps = TemplateCaps(
        tools=_PROBE_TOOL in with_tools,
        tool_calls=_PROBE_ARGUMENT in conversation,
        tool_role=_PROBE_RESULT in results_only,
        system_role=_PROBE_SYSTEM in system,
    )
    _CAPS[template] = caps
    return caps


# ------------------------------------------------------------------ tools as text (Hermes' form)

_HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
"""Qwen 2.5's wording of the Hermes tool prompt, which open models tuned for tools know."""


def hermes_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """One call in Hermes' form, as the model would write it."""
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def _hermes_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    return _HERMES_TOOLS.format(tools="".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools))


def _as_text(
    messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None, caps: TemplateCaps
) -> list[dict[str, Any]]:
    """The messages with what the template would drop written as text (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if calls and not caps.tool_calls:
            del message["tool_calls"]
            blocks = "\n".join(
                hermes_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in calls
            )
            message["content"] = f"{message['content']}\n{blocks}" if message["content"] else blocks
        if message["role"] == "tool" and not (caps.tools and caps.tool_role):
            text = f"<tool_response>\n{message['content']}\n</tool_response>"
            if caps.tool_role:
                message["content"] = text
            elif out and out[-1].get("from_tools"):
                out[-1]["content"] += "\n" + text
                continue
            else:
                message = {"role": "user", "content": text, "from_tools": True}
        out.append(message)
    for message in out:
        message.pop("from_tools", None)
    if tools and not caps.tools:
        prompt = _hermes_prompt(tools)
        if caps.system_role:
            if out[0]["role"] == "system":
                out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
            else:
                out.insert(0, {"role": "system", "content": prompt})
        else:
            out[0]["content"] = f"{prompt}\n\n{out[0]['content']}"
    return out


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` (offering ``tools`` when given); a template's own error
    (``raise_exception``) becomes a TemplateError."""
    normalized = normalize_messages(list(messages))
    values: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    if template:
        caps = template_caps(template)
        values["messages"] = _as_text(normalized, tools, caps)
        if tools and caps.tools:
            values["tools"] = list(tools)
        try:
            return _compile(template).render(**values)
        except TemplateError:
            raise
        except jinja2.TemplateError as error:
            log.warning("the model's chat template failed (%s); using the fallback transcript", error)
    values["messages"] = _as_text(normalized, tools, template_caps(None))
    values.pop("tools", None)
    return _compile(FALLBACK_TEMPLATE).render(**values)

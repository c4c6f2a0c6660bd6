"""Tool calling in both APIs: a request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``,
the grammar that forces a call, and the calls in OpenAI's and Ollama's shapes. How models write
calls and how they are found in the output is :mod:`.tool_formats`.

**tool_choice.** ``auto`` (the default): the tools are offered to the template, the model writes
freely and calls are parsed from the output; ``none``: the tools are not offered and nothing is
parsed; ``required`` or a named function: the output is constrained by a grammar to the format's
wrapper around JSON matching ``{"name": <a tool's name>, "arguments": <that tool's parameters>}``
(one call; with ``parallel_tool_calls``, one or more), built with llama.cpp's JSON-schema
conversion (:func:`.structured.json_schema_grammar`) per tool, the rule names namespaced so that the
schemas combine into one grammar. The Llama 3.x templates refuse to render several calls in one turn,
so the grammar forces one call for that format whatever ``parallel_tool_calls`` says. Under ``auto``
with a ``response_format`` (Ollama: ``format``) the grammar allows a call or the asked-for JSON.
Ollama has no ``tool_choice``: its ``tools`` mean ``auto``.

**Streaming.** A call goes out once complete (see :mod:`.tool_formats`): in OpenAI's shape its first
delta with index, id, type, name and empty arguments, then the arguments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine import TextChunk, TokenLogprob
from .common import ApiError, Dialect
from .structured import UnsupportedSchemaError, json_schema_grammar
from .tool_formats import (
    Tool,
    ToolCall,
    ToolCallParser,
    ToolFormat,
    detect_format,
    gbnf_literal,
    namespace_grammar,
)

__all__ = [
    "ToolCall",
    "ToolRequest",
    "ToolStream",
    "finish_reason",
    "ollama_tool_calls",
    "ollama_tools",
    "openai_tool_call_deltas",
    "openai_tool_calls",
    "openai_tools",
]

Choice = Literal["auto", "none", "required", "function"]


# ------------------------------------------------------------------ requests

_OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param)


def _parse_tools(value: Any, dialect: Dialect) -> tuple[Tool, ...]:
    if not isinstance(value, list):
        raise _bad("tools must be a list of tools", "tools")
    tools: list[Tool] = []
    for index, tool in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping):
            raise _bad(f"{where} must be an object", where)
        for key in tool:
            if key not in _TOOL_KEYS:
                raise _bad(f"unknown field {where}.{key}", f"{where}.{key}")
        kind = tool.get("type", "function" if dialect == "ollama" else None)
        if kind != "function":
            raise _bad(
                f'{where}.type must be "function" (the only kind of tool this server calls)', f"{where}.type"
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise _bad(f"{where}.function must be an object", f"{where}.function")
        for key in function:
            if key not in _FUNCTION_KEYS:
                raise _bad(f"unknown field {where}.function.{key}", f"{where}.function.{key}")
        name = function.get("name")
        if dialect == "openai":
            if not isinstance(name, str) or not _OPENAI_NAME.match(name):
                raise _bad(
                    f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes",
                    f"{where}.function.name",
                )
        elif not isinstance(name, str) or not name:
            raise _bad(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
        if any(t.name == name for t in tools):
            raise _bad(f"{where}.function.name: {name!r} is declared twice", f"{where}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{where}.function.description must be a string", f"{where}.function.description")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise _bad(
                f'{where}.function.parameters must be a JSON schema of "type": "object"',
                f"{where}.function.parameters",
            )
        declared: dict[str, Any] = {"name": name}
        if description is not None:
            declared["description"] = description
        declared["parameters"] = parameters
        tools.append(Tool(index, name, parameters, {"type": "function", "function": declared}))
    return tuple(tools)


def _parse_choice(value: Any, tools: Sequence[Tool]) -> tuple[Choice, str | None]:
    if value is None:
        return "auto", None
    if value in ("auto", "none", "required"):
        return value, None
    if isinstance(value, Mapping) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise _bad("tool_choice.function.name must be a string", "tool_choice")
        if not any(tool.name == name for tool in tools):
            raise _bad(
                f"tool_choice names the function {name!r}, which tools does not declare", "tool_choice"
            )
        return "function", name
    if isinstance(value, Mapping) and isinstance(value.get("type"), str):
        raise _bad(f"tool_choice of type {value['type']!r} is not supported", "tool_choice")
    raise _bad(
        'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


@dataclass(frozen=True)
class ToolRequest:
    """One request's tools and what to do with them (see the module docstring)."""

    tools: tuple[Tool, ...]
    choice: Choice
    named: str | None
    parallel: bool
    format: ToolFormat
    forced: str | None = field(default=None, repr=False)
    """The grammar of the forced calls (``required`` or a named function)."""

    @property
    def offered(self) -> list[Mapping[str, Any]] | None:
        """What the chat template is given as ``tools``."""
        return None if self.choice == "none" else [tool.declaration for tool in self.tools]

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.format, frozenset(t.name for t in self.tools), parallel=self.parallel)

    def grammar(self, content: str | None) -> str | None:
        """The grammar to sample with, given the one the request's format fields ask for: the
        forced calls' grammar, or under ``auto`` calls or that content (unconstrained without)."""
        if self.forced is not None:
            return self.forced
        if content is None or self.choice == "none":
            return content
        calls = _calls_grammar(self.format, self.tools, several=self.parallel, root="calls")
        return "root ::= calls | content-root\n" + calls + namespace_grammar(content, "content-")

    @classmethod
    def build(
        cls, tools: tuple[Tool, ...], choice: Choice, named: str | None, parallel: bool, template: str | None
    ) -> ToolRequest:
        fmt = detect_format(template)
        forced = None
        if choice in ("required", "function"):
            chosen = tuple(tool for tool in tools if named is None or tool.name == named)
            forced = _calls_grammar(fmt, chosen, several=parallel and choice == "required", root="root")
        return cls(tools, choice, named, parallel, fmt, forced)


def _calls_grammar(fmt: ToolFormat, tools: Sequence[Tool], *, several: bool, root: str) -> str:
    """Rules for calls to ``tools`` in ``fmt``'s wrapper, the top rule named ``root``: each tool's
    parameters schema converted on its own (its ``$ref``s resolve against it) and namespaced."""
    rules: list[str] = []
    alternatives: list[str] = []
    for tool in tools:
        prefix = f"tool{tool.index}-"
        try:
            schema_grammar = json_schema_grammar(tool.parameters)
        except UnsupportedSchemaError as error:
            where = f"tools[{tool.index}].function.parameters"
            raise _bad(f"{where} {error}", where) from None
        rules.append(namespace_grammar(schema_grammar, prefix).strip() + "\n")
        rules.append(f"{prefix}call ::= {fmt.call_rule(tool, prefix + 'root')}\n")
        alternatives.append(f"{prefix}call")
    rules.append(f"tool-call ::= {' | '.join(alternatives)}\n")
    item = "tool-call"
    if fmt.end is not None:
        opening, closing = gbnf_literal(fmt.marker + "\n"), gbnf_literal("\n" + fmt.end)
        rules.append(f"tool-block ::= {opening} tool-call {closing}\n")
        item = "tool-block"
    parts = [item + (f" ({gbnf_literal(fmt.separator)} {item})*" if several and fmt.parallel else "")]
    if fmt.grammar_open:
        parts.insert(0, gbnf_literal(fmt.grammar_open))
    if fmt.grammar_close:
        parts.append(gbnf_literal(fmt.grammar_close))
    return f"{root} ::= {' '.join(parts)}\n" + "".join(rules)


def openai_tools(body: Mapping[str, Any], template: str | None) -> ToolRequest | None:
    """The request's tools (None when it has none); a 400 naming the field when they are wrong."""
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    raw = body.get("tools")
    if raw is None:
        choice = body.get("tool_choice")
        if choice is not None and choice not in ("auto", "none"):
            raise _bad("tool_choice needs tools to choose from", "tool_choice")
        return None
    if isinstance(raw, list) and not raw:
        raise _bad("tools must hold at least one tool (leave it out for none)", "tools")
    tools = _parse_tools(raw, "openai")
    choice, named = _parse_choice(body.get("tool_choice"), tools)
    return ToolRequest.build(tools, choice, named, parallel is not False, template)


def ollama_tools(body: Mapping[str, Any], template: str | None) -> ToolRequest | None:
    """Ollama's ``tools``: offered and parsed (``auto``); an empty list is no tools."""
    raw = body.get("tools")
    if raw is None or raw == []:
        return None
    return ToolRequest.build(_parse_tools(raw, "ollama"), "auto", None, True, template)


# ------------------------------------------------------------------ responses


class ToolStream:
    """A streamed answer through a :class:`ToolCallParser`: what to send for each chunk of text.

    A chunk's logprob entries travel with the content they produced; those of held-back text wait
    for it, and those of a call's text are dropped with it (OpenAI gives logprobs for content only).
    """

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.sent: list[ToolCall] = []
        self._held: list[TokenLogprob] = []

    def feed(self, event: TextChunk) -> tuple[TextChunk | None, list[ToolCall], int]:
        """The content chunk to send (None: nothing yet), the calls completed and the index of the
        first of them."""
        self._held.extend(event.logprobs)
        return self._out(*self.parser.feed(event.text))

    def finish(self) -> tuple[TextChunk | None, list[ToolCall], int]:
        return self._out(*self.parser.finish())

    def _out(self, content: str, calls: list[ToolCall]) -> tuple[TextChunk | None, list[ToolCall], int]:
        chunk = None
        if content:
            chunk = TextChunk(content, tuple(self._held))
            self._held.clear()
        first = len(self.sent)
        self.sent += calls
        if calls:
            self._held.clear()
        return chunk, calls, first


def finish_reason(reason: str, calls: Sequence[ToolCall]) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


def openai_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """``message.tool_calls`` of a chat completion."""
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
        for call in calls
    ]


def openai_tool_call_deltas(calls: Sequence[ToolCall], first_index: int) -> list[dict[str, Any]]:
    """``delta.tool_calls`` entries as OpenAI streams a call: its head (id, type, name, empty
    arguments), then its arguments."""
    deltas: list[dict[str, Any]] = []
    for offset, call in enumerate(calls):
        index = first_index + offset
        deltas.append(
            {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        )
        deltas.append({"index": index, "function": {"arguments": call.arguments_json}})
    return deltas


def ollama_tool_calls(calls: Sequence[ToolCall], first_index: int = 0) -> list[dict[str, Any]]:
    """``message.tool_calls`` as Ollama writes them (arguments an object)."""
    return [
        {"function": {"index": first_index + offset, "name": call.name, "arguments": dict(call.arguments)}}
        for offset, call in enumerate(calls)
    ]

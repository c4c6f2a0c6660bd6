"""How models write tool calls, and finding the calls in what one wrote, whole or as it streams.

**Formats.** Models write calls in the format they were tuned on, which their chat template shows;
the format is detected from the template's text:

* **Hermes/Qwen**: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block a call;
* **Llama 3.x**: a JSON object ``{"name": ..., "parameters": {...}}`` as the whole answer, optionally
  after ``<|python_tag|>``;
* **Mistral**: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

A template that does not render ``tools`` is given the tools in Hermes' form (see
:mod:`..engine.chat_template`), so Hermes is also the format for those and the generic fallback. The
markers are often special tokens, which the runtime's detokenizer does not write out, so a call is
also recognised without its marker when the answer starts with the call's JSON (as llama.cpp's
parsers do).

**What counts as a call.** A block that parses as JSON objects naming a declared tool, whose
arguments are an object (or a JSON string of one). Anything else stays content, text and marker
included, so nothing the model wrote is lost. With ``parallel_tool_calls: false`` only the first
call is kept.

**Streaming.** Text is streamed as content until it might be a call's start: a possible prefix of a
marker, or of the call's JSON at the very start of the answer, is held back until it is decided. A
call is sent once its text is complete and parsed, so a client never sees a call's raw text as
content nor a call that later proves malformed.

**Grammars.** :func:`namespace_grammar` renames a GBNF grammar's rules under a prefix, so that the
grammars of several JSON schemas (one per tool) combine into one; :meth:`ToolFormat.call_rule` is the
call's JSON around a tool's arguments rule.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.chat_template import template_caps

__all__ = [
    "HERMES",
    "LLAMA3",
    "MISTRAL",
    "Tool",
    "ToolCall",
    "ToolCallParser",
    "ToolFormat",
    "detect_format",
    "gbnf_literal",
    "namespace_grammar",
]


@dataclass(frozen=True)
class Tool:
    """A declared function: what the template is offered and what a call's arguments must match."""

    index: int
    name: str
    parameters: Mapping[str, Any]
    declaration: Mapping[str, Any]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: Mapping[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


# ------------------------------------------------------------------ GBNF composition

_RULE = re.compile(r"^\s*([a-zA-Z0-9-]+)\s*::=", re.MULTILINE)
_WORD = re.compile(r"[a-zA-Z0-9-]+")
_SKIP_UNTIL = {'"': '"', "[": "]", "{": "}", "<": ">"}


def namespace_grammar(gbnf: str, prefix: str) -> str:
    """``gbnf`` with every rule it defines renamed ``prefix + name`` (its root becomes
    ``prefix + "root"``), so that several grammars can live in one. Literals, character classes,
    repetition counts and token references are copied as they are."""
    names = set(_RULE.findall(gbnf))
    out: list[str] = []
    i = 0
    while i < len(gbnf):
        char = gbnf[i]
        if char in _SKIP_UNTIL:
            close = _SKIP_UNTIL[char]
            j = i + 1
            while j < len(gbnf) and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i : j + 1])
            i = j + 1
        elif char == "#":
            j = gbnf.find("\n", i)
            i = len(gbnf) if j < 0 else j
        else:
            match = _WORD.match(gbnf, i)
            if match:
                word = match.group()
                out.append(prefix + word if word in names else word)
                i = match.end()
            else:
                out.append(char)
                i += 1
    return "".join(out)


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\r":
            escaped.append("\\r")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20:
            escaped.append(f"\\x{ord(char):02X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


# ------------------------------------------------------------------ formats


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes calls (see the module docstring)."""

    name: str
    marker: str
    """Opens calls anywhere in the answer."""
    end: str | None
    """Closes one call; None: the calls run to the end of the answer."""
    opener: str
    """What a call without its marker starts with (whitespace removed), at the answer's start."""
    arguments_key: str
    separator: str
    """Between forced calls."""
    grammar_open: str = ""
    grammar_close: str = ""
    """Around the forced calls (for a format without ``end``)."""
    parallel: bool = True
    """Whether a grammar may force several calls."""

    def call_rule(self, tool: Tool, arguments_rule: str) -> str:
        """GBNF for one call object of ``tool``, its arguments matching ``arguments_rule``."""
        head = '{"name": ' + json.dumps(tool.name, ensure_ascii=False) + ', "' + self.arguments_key + '": '
        return f"{gbnf_literal(head)} {arguments_rule} {gbnf_literal('}')}"


HERMES = ToolFormat(
    name="hermes",
    marker="<tool_call>",
    end="</tool_call>",
    opener='{"name"',
    arguments_key="arguments",
    separator="\n",
)
LLAMA3 = ToolFormat(
    name="llama3",
    marker="<|python_tag|>",
    end=None,
    opener='{"name"',
    arguments_key="parameters",
    separator="; ",
    parallel=False,  # the Llama 3.x templates refuse to render several calls in one turn
)
MISTRAL = ToolFormat(
    name="mistral",
    marker="[TOOL_CALLS]",
    end=None,
    opener='[{"name"',
    arguments_key="arguments",
    separator=", ",
    grammar_open="[TOOL_CALLS][",
    grammar_close="]",
)


def detect_format(template: str | None) -> ToolFormat:
    """The format the model was tuned to write calls in, from its chat template."""
    if not template or not template_caps(template).tools:
        return HERMES  # the template gets Hermes' instructions (see engine.chat_template)
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return LLAMA3
    return HERMES


# ------------------------------------------------------------------ parsing output


def _json_values(text: str) -> list[Any] | None:
    """The JSON values ``text`` holds, one after another (whitespace or ``;`` between); None when
    anything else is in it."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i = 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values or None
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _call(value: Any, fmt: ToolFormat, names: frozenset[str]) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    other = "parameters" if fmt.arguments_key == "arguments" else "arguments"
    arguments = value.get(fmt.arguments_key, value.get(other, {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    return name, arguments


def _calls(body: str, fmt: ToolFormat, names: frozenset[str]) -> list[tuple[str, dict[str, Any]]] | None:
    values = _json_values(body)
    if values is None:
        return None
    flat = [item for value in values for item in (value if isinstance(value, list) else [value])]
    calls = [_call(value, fmt, names) for value in flat]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _new_id(fmt: ToolFormat) -> str:
    if fmt is MISTRAL:  # Mistral's templates refuse any other id when the call comes back
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Splits an answer into content and calls as its text arrives (see the module docstring).

    ``feed`` and ``finish`` return the content that may be sent now and the calls completed since
    the last call; a whole answer is ``feed(text)`` then ``finish()``."""

    def __init__(self, fmt: ToolFormat, names: frozenset[str], *, parallel: bool = True) -> None:
        self.fmt = fmt
        self.names = names
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self._state: Literal["start", "content", "call", "to_end"] = "start"
        self._buffer = ""
        self._marker = ""
        """The marker that opened the call being held ("" for a call without its marker)."""
        self._whitespace = ""
        """Whitespace-only content, held until something follows it (dropped after calls)."""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = self._advance(final=True)
        if not self.calls:
            content += self._whitespace
        self._whitespace = ""
        return content, calls

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole answer: its content (None when it is only calls) and its calls."""
        content, calls = self.feed(text)
        rest, more = self.finish()
        content += rest
        calls += more
        if calls:
            return content.strip() or None, calls
        return content, calls

    def _content(self, text: str) -> str:
        text = self._whitespace + text
        if not text.strip():
            self._whitespace = text
            return ""
        self._whitespace = ""
        return text

    def _found(self, body: str) -> list[ToolCall] | None:
        parsed = _calls(body, self.fmt, self.names)
        if parsed is None:
            return None
        found = []
        for name, arguments in parsed:
            if self.parallel or not self.calls:
                call = ToolCall(_new_id(self.fmt), name, arguments)
                self.calls.append(call)
                found.append(call)
        return found

    def _advance(self, *, final: bool) -> tuple[str, list[ToolCall]]:
        fmt = self.fmt
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            buffer = self._buffer
            if self._state == "start":
                compact = "".join(buffer.split())[: len(fmt.opener)]
                if compact == fmt.opener:
                    self._state, self._marker = "to_end", ""
                elif fmt.opener.startswith(compact) and not final:
                    break
                else:
                    self._state = "content"
            elif self._state == "content":
                at = buffer.find(fmt.marker)
                if at >= 0:
                    content.append(self._content(buffer[:at]))
                    self._buffer = buffer[at + len(fmt.marker) :]
                    self._marker = fmt.marker
                    self._state = "call" if fmt.end is not None else "to_end"
                    continue
                keep = 0 if final else _partial_suffix(buffer, fmt.marker)
                content.append(self._content(buffer[: len(buffer) - keep]))
                self._buffer = buffer[len(buffer) - keep :]
                break
            elif self._state == "call":
                assert fmt.end is not None
                at = buffer.find(fmt.end)
                if at < 0 and not final:
                    break
                body = buffer if at < 0 else buffer[:at]
                closing = "" if at < 0 else fmt.end
                found = self._found(body)
                if found is None:
                    content.append(self._content(self._marker + body + closing))
                else:
                    calls += found
                self._buffer = "" if at < 0 else buffer[at + len(fmt.end) :]
                self._state = "content"
                if at < 0:
                    break
            else:  # to_end
                if not final:
                    break
                found = self._found(buffer)
                if found is None:
                    content.append(self._content(self._marker + buffer))
                else:
                    calls += found
                self._buffer = ""
                break
        return "".join(content), calls


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that ``marker`` starts with (held back)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0

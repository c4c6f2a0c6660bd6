"""Structured output: JSON Schema (and "any JSON") to a GBNF grammar the engine samples under.

**How.** Ollama's ``format`` (``"json"`` or a schema) and OpenAI's ``response_format``
(``json_object``, ``json_schema``) become ``SamplingParams.grammar``; the engine constrains every
token with llama.cpp's grammar sampler (see :mod:`..engine.grammar`), so the answer parses and
validates unless ``max_tokens`` or a stop sequence cuts it short (finish reason ``length``/stop
sequence, as with OpenAI). Schemas go through llama-cpp-python's own converter
(``llama_cpp.llama_grammar.SchemaConverter``, llama.cpp's ``json_schema_to_grammar.py``) with four
corrections in a subclass, each a case where its grammar produced invalid JSON or the wrong
constraint: string characters exclude the control characters JSON must escape (and lone
surrogates in ``\\u`` escapes); literals (``enum``/``const`` values, property names) escape
backslashes; ``date`` has only days its month has; a ``$ref`` gets a rule of its own instead of
one named after its last path segment (which two targets, or a built-in rule, can share).

**Supported** (enforced by the grammar): ``type`` (one or a list), ``enum``, ``const``,
``properties`` with ``required`` (properties come in the schema's order; a property that is not
required may be left out; no other key appears), ``additionalProperties`` (``false``, or a schema
when there are no ``properties``), ``items`` with ``minItems``/``maxItems``, tuples
(``prefixItems`` or a list of ``items``), ``anyOf``, ``oneOf`` whose alternatives exclude each
other (different types or ``const``/``enum`` values, or a required property with different
``const``/``enum`` values: a discriminator), ``allOf`` of objects with distinct properties (all of
them become required), local ``$ref`` (``#/...``, recursion included), string ``minLength``/
``maxLength``, ``pattern`` (a subset of regular expressions: see
:func:`.schema_support.translate_pattern`), ``format`` ``date``, ``time``, ``date-time``, ``uuid``.
An empty schema is answered with an object (as llama.cpp does). Annotations are accepted and
ignored: ``title``, ``description``, ``default``, ``examples``, ``$schema``, ``$id`` (root),
``$comment``, ``deprecated``, ``readOnly``, ``writeOnly``, ``discriminator``, ``x-*``.

**Refused** (400 naming each keyword with its path, :class:`UnsupportedSchemaError`): what the
converter would silently ignore, so the answer could fail validation: ``minimum``, ``maximum``,
``exclusiveMinimum``, ``exclusiveMaximum``, ``multipleOf``, ``uniqueItems``, ``contains``,
``not``, ``if``/``then``/``else``, ``dependentRequired``, ``dependentSchemas``,
``patternProperties``, ``propertyNames``, ``minProperties``/``maxProperties`` (unless every answer
meets them), ``unevaluatedProperties``, remote ``$ref``, other ``format`` values (``email``,
``uri``...), patterns it cannot translate (lookarounds, backreferences, ``\\D``...), keywords next to
``$ref``/``anyOf``/``oneOf``/``enum``/``const``/``pattern`` that the converter drops there,
``additionalProperties`` beside ``properties`` (an extra key could repeat a property's name),
overlapping ``oneOf``, counts above 1000 (llama.cpp's grammar limit) and unknown keywords.

**Whitespace.** A model with nothing to say in JSON can loop on whitespace forever where a grammar
allows unbounded whitespace (json.gbnf's original ``ws ::= ([ \\t\\n] ws)?``), so every place
whitespace may go allows a bounded amount: the converter's ``space ::= " "?`` is one optional space,
and :data:`JSON_GRAMMAR` (llama.cpp's current json.gbnf) allows one space or one newline and up to
20 spaces or tabs. Strings, numbers and nesting stay unbounded in ``format: "json"``, as there;
``max_tokens`` bounds them.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Mapping
from typing import Any

from .common import ApiError
from .schema_support import SchemaWalker

__all__ = [
    "JSON_GRAMMAR",
    "UnsupportedSchemaError",
    "json_schema_grammar",
    "ollama_format_grammar",
    "openai_response_format_grammar",
]

JSON_GRAMMAR = r"""root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""
"""Any JSON object: llama.cpp's grammars/json.gbnf (``llama_cpp.llama_grammar.JSON_GBNF``), copied
so that importing the API does not load llama.cpp; a test keeps the two identical. Its ``ws`` is
bounded (see the module's docstring)."""

_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-CefEF] [0-9a-fA-F] | [dD] [0-7]) '
    r"[0-9a-fA-F] [0-9a-fA-F])"
)
"""A JSON string's character: llama.cpp's newer converter's rule (the Python one lets raw control
characters through, which JSON parsers reject), without ``\\uD800``-``\\uDFFF`` (lone surrogates
are not characters; a pair would count as two for ``maxLength``)."""

_DATE = (
    '[1-9] [0-9] [0-9] [0-9] "-" ( ( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )'
    ' | ( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" )'
    ' | "02" "-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] ) )'
)
"""A calendar date: the converter's allows February 31st and year 0, which date parsers refuse.
February stops at the 28th, year 1000 is the first (a subset of valid dates)."""

_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class UnsupportedSchemaError(ValueError):
    """The schema uses what the grammar cannot enforce. ``features`` are the keywords with their
    path (``properties.age.minimum``); ``reasons`` says why where it is not obvious."""

    def __init__(self, features: list[str], reasons: Mapping[str, str] | None = None) -> None:
        self.features = features
        self.reasons = dict(reasons or {})
        described = [f"{f} ({self.reasons[f]})" if self.reasons.get(f) else f for f in features]
        super().__init__(
            "uses JSON Schema features constrained decoding cannot enforce: " + ", ".join(described)
        )


@functools.cache
def _converter_class() -> Any:
    """The converter with its corrections (built on first use: importing it loads llama.cpp)."""
    llama_grammar: Any = importlib.import_module("llama_cpp.llama_grammar")  # untyped

    class Converter(llama_grammar.SchemaConverter):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self._ref_rules: dict[str, str] = {}

        def _format_literal(self, literal: str) -> str:
            escaped = "".join(
                _LITERAL_ESCAPES.get(c, c if ord(c) >= 0x20 else f"\\x{ord(c):02X}") for c in literal
            )
            return f'"{escaped}"'

        def _add_primitive(self, name: str, rule: Any) -> str:
            if name in ("char", "date"):
                rule = type(rule)(_CHAR if name == "char" else _DATE, rule.deps)
            return str(super()._add_primitive(name, rule))

        def _resolve_ref(self, ref: str) -> str:
            name = self._ref_rules.get(ref)
            if name is None:
                # reserve a name of its own first: a recursive reference needs it before it exists
                name = self._add_rule("ref-" + ref.rsplit("/", 1)[-1], f"<{ref}>")
                self._ref_rules[ref] = name
                self._rules[name] = self.visit(self._refs[ref], name)
            return name

    return Converter


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """The GBNF grammar (root rule ``root``) of the JSON values valid under ``schema``;
    :class:`UnsupportedSchemaError` when the schema uses what the grammar cannot enforce."""
    if not isinstance(schema, Mapping):
        raise UnsupportedSchemaError(["(the schema itself)"], {"(the schema itself)": "not an object"})
    walker = SchemaWalker(schema)
    normalized = walker.normalized()
    if walker.problems:
        raise UnsupportedSchemaError(list(walker.problems), walker.problems)
    converter = _converter_class()()
    try:
        document = converter.resolve_refs(normalized, "schema")
        root = converter.visit(document, "")
        grammar = str(converter.format_grammar())
    except Exception as error:  # the converter's asserts and lookups: a schema it cannot take
        raise UnsupportedSchemaError(["(the schema itself)"], {"(the schema itself)": str(error)}) from None
    if root != "root":  # a rule named after a property took the name (cannot happen after the walk)
        raise UnsupportedSchemaError(["(the schema itself)"], {"(the schema itself)": "no root rule"})
    return grammar


def _schema_grammar(schema: Any, field: str, param: str) -> str:
    if not isinstance(schema, dict):
        raise ApiError(400, f"{field} must be a JSON Schema object", param=param)
    try:
        return json_schema_grammar(schema)
    except UnsupportedSchemaError as error:
        raise ApiError(400, f"{field}: {error}", param=param) from None


def ollama_format_grammar(value: Any) -> str | None:
    """Ollama's ``format``: ``"json"`` (any JSON object), a JSON Schema object, or ``""``/absent
    (free text). Anything else is a 400 with Ollama's message."""
    if value is None or value == "":
        return None
    if value == "json":
        return JSON_GRAMMAR
    if isinstance(value, dict):
        return _schema_grammar(value, "format", "format")
    shown = json.dumps(value) if not isinstance(value, str) else f'"{value}"'
    raise ApiError(
        400, f'invalid format: {shown[:60]}; expected "json" or a valid JSON Schema object', param="format"
    )


_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def openai_response_format_grammar(value: Any) -> str | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (free text), ``{"type": "json_object"}``
    (any JSON object; llama.cpp's server also takes a ``schema`` there, and so does this one) or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``. The
    grammar applies whatever ``strict`` says (OpenAI's non-strict mode only tries); without a
    ``schema`` it is any JSON object. A malformed value is a 400 naming the field."""
    if value is None:
        return None
    param = "response_format"
    if not isinstance(value, dict):
        raise ApiError(400, "response_format must be an object with a type", param=param)
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise ApiError(
            400,
            f"response_format.type must be one of text, json_object, json_schema; got {json.dumps(kind)}",
            param=param,
        )
    for key in value:
        if key not in allowed[kind]:
            raise ApiError(400, f"unknown field response_format.{key} for type {kind}", param=param)
    if kind == "text":
        return None
    if kind == "json_object":
        if value.get("schema") is None:
            return JSON_GRAMMAR
        return _schema_grammar(value["schema"], "response_format.schema", param)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "response_format.json_schema must be an object", param=param)
    for key in spec:
        if key not in ("name", "schema", "strict", "description"):
            raise ApiError(400, f"unknown field response_format.json_schema.{key}", param=param)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise ApiError(
            400,
            "response_format.json_schema.name is required: 1 to 64 letters, digits, underscores or dashes",
            param=param,
        )
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ApiError(400, "response_format.json_schema.strict must be a boolean", param=param)
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise ApiError(400, "response_format.json_schema.description must be a string", param=param)
    if spec.get("schema") is None:
        return JSON_GRAMMAR
    return _schema_grammar(spec["schema"], "response_format.json_schema.schema", param)

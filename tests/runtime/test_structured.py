"""Structured output: Ollama's ``format`` and OpenAI's ``response_format`` through the official
clients against a real runtime, the schema-to-grammar conversion and the engine's grammar sampling.

The model has random weights, so the tests rest on what the grammar guarantees: the schemas here
force an answer of bounded length (enums, booleans, integers, strings with ``maxLength``, arrays
with ``maxItems``, objects without other keys), so a request ends with ``stop`` well within its
``max_tokens`` and its answer validates with ``jsonschema``. Where a grammar allows unbounded text
(any JSON object), the sampling settings make the closing characters likely (a ``logit_bias`` in
OpenAI; in Ollama a negative presence penalty over a prompt made of them), and only validity is
asserted. The conversion is also checked without a model: llama.cpp's grammar engine, on the
model's vocabulary alone, draws random strings from each grammar and every one must validate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import datetime as dt
import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parallama_runtime import serve
from parallama_runtime.api.schema_support import (
    REPETITION_LIMIT,
    PatternError,
    SchemaWalker,
    translate_pattern,
)
from parallama_runtime.api.structured import JSON_GRAMMAR, UnsupportedSchemaError, json_schema_grammar
from parallama_runtime.engine import Engine, EngineConfig, GrammarError, SamplingParams, TextChunk
from parallama_runtime.engine.grammar import (
    MAX_GROUP_NESTING,
    Candidates,
    GrammarSampler,
    _complete_length,
    _utf8_prefix,
    group_nesting,
)
from runtime_helpers import SERVED_NAME, post_json, settings_for

SCHEMA: dict[str, Any] = {
    "title": "Thing",
    "description": "every kind of bounded field",
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6, "description": "short"},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "when": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "number"}]},
    },
    "required": ["name", "ok", "color", "count", "tags", "when", "code"],
    "additionalProperties": False,
}
"""Every answer under this schema is at most a few hundred tokens."""

CHAT = [{"role": "user", "content": "describe a thing"}]
ROOM = 700
"""``max_tokens`` for bounded schemas: more than any answer SCHEMA allows."""


def validate(text: str, schema: dict[str, Any]) -> Any:
    """The answer parsed and validated, formats included (for the schema's draft: 2020-12 unless
    it says otherwise)."""
    value = json.loads(text)
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    validator(schema, format_checker=FORMATS).validate(value)
    return value


FORMATS = jsonschema.FormatChecker(["date", "uuid"])
"""jsonschema checks time and date-time only with rfc3339-validator installed: Python's ISO parser
(RFC 3339's full-time and date-time are ISO 8601 forms it reads) stands in."""
FORMATS.checks("time", raises=ValueError)(lambda text: bool(dt.time.fromisoformat(text)))
FORMATS.checks("date-time", raises=ValueError)(lambda text: bool(dt.datetime.fromisoformat(text)))


@pytest.fixture(scope="module")
def structured_server(model_path: Path) -> Iterator[serve.BackgroundServer]:
    """Room for a bounded schema's longest answer (the shared server's slots hold 256 tokens)."""
    running = serve.BackgroundServer(settings_for(model_path, "--parallel", "2", "--num-ctx", "1024")).start()
    yield running
    running.stop()


@pytest.fixture
def oai(structured_server: serve.BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=structured_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def oll(structured_server: serve.BackgroundServer) -> ollama.Client:
    return ollama.Client(host=structured_server.url)


def _openai_chat(oai: openai.OpenAI, *, stream: bool = False, **request: Any) -> tuple[str, str | None]:
    """The answer's text and finish reason, streamed (joined from the deltas) or not."""
    create: Any = oai.chat.completions.create  # the request's dicts are the wire format
    if not stream:
        choice = create(model=SERVED_NAME, messages=CHAT, **request).choices[0]
        return choice.message.content or "", choice.finish_reason
    chunks = [c for c in create(model=SERVED_NAME, messages=CHAT, stream=True, **request) if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def _ollama(oll: ollama.Client, *, chat: bool, stream: bool = False, **request: Any) -> tuple[str, Any]:
    """The answer's text (joined from the parts when streamed) and the final response object."""
    call: Any = oll.chat if chat else oll.generate

    def text(part: Any) -> str:
        return str((part.message.content if chat else part.response) or "")

    if not stream:
        response = call(model=SERVED_NAME, **request)
        return text(response), response
    parts = list(call(model=SERVED_NAME, stream=True, **request))
    return "".join(text(part) for part in parts), parts[-1]


# ------------------------------------------------------------------ Ollama


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat_format_schema_validates(oll: ollama.Client, stream: bool) -> None:
    for seed in range(3):
        options = {"num_predict": ROOM, "seed": seed}
        text, final = _ollama(oll, chat=True, stream=stream, messages=CHAT, format=SCHEMA, options=options)
        assert final.done_reason == "stop"
        validate(text, SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_generate_format_schema_validates(oll: ollama.Client, stream: bool) -> None:
    options = {"num_predict": ROOM, "seed": 11}
    text, final = _ollama(oll, chat=False, stream=stream, prompt="a thing", format=SCHEMA, options=options)
    assert final.done_reason == "stop"
    validate(text, SCHEMA)


CLOSERS = '"' * 60 + "}" * 30
"""A prompt whose tokens a negative frequency penalty over the whole history makes the likely ones,
in this order: ``"`` (+60 and more with each one written), then ``}`` (+30), far above the few
other tokens the prompt holds (+1 to +3) and the random weights' own preferences. Under "any JSON
object" the answer is then ``{"":""}`` give or take whitespace: the grammar writes the rest."""
CLOSING = {"frequency_penalty": -1, "repeat_penalty": 1.0, "repeat_last_n": -1, "num_predict": 400}


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_format_json_is_a_json_object(oll: ollama.Client, stream: bool) -> None:
    for seed in range(2):
        options = {**CLOSING, "seed": seed}
        text, final = _ollama(
            oll, chat=False, stream=stream, prompt=CLOSERS, raw=True, format="json", options=options
        )
        assert final.done_reason == "stop", text[-300:]
        assert isinstance(json.loads(text), dict)


def test_ollama_chat_format_json(oll: ollama.Client) -> None:
    messages = [{"role": "user", "content": CLOSERS}]
    text, final = _ollama(oll, chat=True, messages=messages, format="json", options=CLOSING)
    assert final.done_reason == "stop", text[-300:]
    assert isinstance(json.loads(text), dict)


def test_ollama_empty_format_is_free_text(structured_server: serve.BackgroundServer) -> None:
    status, body = post_json(
        structured_server.url + "/api/generate",
        {"model": SERVED_NAME, "prompt": "hi", "format": "", "stream": False, "options": {"num_predict": 4}},
        timeout=120,
    )
    assert status == 200 and body["done"]


def test_ollama_unsupported_schema_is_a_400_naming_the_features(oll: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0},
            "mail": {"type": "string", "format": "email"},
        },
    }
    with pytest.raises(ollama.ResponseError) as caught:
        oll.chat(model=SERVED_NAME, messages=CHAT, format=schema)
    assert caught.value.status_code == 400
    assert "properties.age.minimum" in caught.value.error
    assert "properties.mail.format" in caught.value.error


def test_ollama_invalid_format_is_a_400(structured_server: serve.BackgroundServer) -> None:
    for value in ("xml", 3, ["json"]):
        status, body = post_json(
            structured_server.url + "/api/generate",
            {"model": SERVED_NAME, "prompt": "hi", "format": value, "stream": False},
            timeout=120,
        )
        assert status == 400
        assert "invalid format" in body["error"], body


def test_ignore_eos_still_ends_where_the_grammar_does(oll: ollama.Client) -> None:
    """An end-of-generation token under a grammar is the grammar's end: ignore_eos cannot make the
    request run on to num_predict (it would only repeat end tokens)."""
    options = {"num_predict": ROOM, "ignore_eos": True, "seed": 5}
    text, final = _ollama(oll, chat=False, prompt="x", format=SCHEMA, options=options)
    assert final.done_reason == "stop"
    assert final.eval_count < ROOM
    validate(text, SCHEMA)


def test_prompt_tokens_do_not_reach_the_grammar(oll: ollama.Client) -> None:
    """The penalties see the prompt (repeat_penalty 1.5 over the whole history); the grammar must not:
    the prompt is text it would refuse from the first character (llama.cpp aborts the process when
    a grammar accepts a token it rejects), and the answer must still match from its start."""
    prompt = "this prompt is plain prose, not JSON: words } ] , and more words " * 8
    options = {"repeat_penalty": 1.5, "repeat_last_n": -1, "num_predict": ROOM, "seed": 3}
    for raw in (True, False):
        text, final = _ollama(oll, chat=False, prompt=prompt, raw=raw, format=SCHEMA, options=options)
        assert final.done_reason == "stop"
        validate(text, SCHEMA)


# ------------------------------------------------------------------ OpenAI


STRICT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_openai_json_schema_strict_validates(oai: openai.OpenAI, stream: bool) -> None:
    for seed in range(3):
        text, reason = _openai_chat(oai, stream=stream, response_format=STRICT, max_tokens=ROOM, seed=seed)
        assert reason == "stop"
        validate(text, SCHEMA)


def test_concurrent_requests_each_follow_their_own_grammar(oai: openai.OpenAI) -> None:
    """Both slots generate at once, one step sampling for both (over one shared candidate buffer),
    each under its own schema."""
    small = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    formats = [STRICT, {"type": "json_schema", "json_schema": {"name": "small", "schema": small}}] * 2
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda f: _openai_chat(oai, response_format=f, max_tokens=ROOM, seed=1), formats)
        )
    for (text, reason), schema in zip(answers, [SCHEMA, small] * 2, strict=True):
        assert reason == "stop"
        validate(text, schema)


def _closer_bias() -> dict[str, int]:
    """+30 on the tokens that write ``"``, +15 on those that write ``}`` (a character's own token
    and its byte's): far above the random weights' preferences, so that under "any JSON object" the
    answer is ``{"":""}`` give or take whitespace, the grammar writing the rest."""
    from parallama_runtime.demo_model import _vocabulary

    bias = {'"': 30, "}": 15}
    return {
        str(i): bias[char]
        for i, text in enumerate(_vocabulary()[0])
        for char in bias
        if text in (char.encode(), f"<0x{ord(char):02X}>".encode())
    }


@pytest.mark.parametrize("stream", [False, True])
def test_openai_json_object_is_a_json_object(oai: openai.OpenAI, stream: bool) -> None:
    for seed in range(2):
        text, reason = _openai_chat(
            oai,
            stream=stream,
            response_format={"type": "json_object"},
            logit_bias=_closer_bias(),
            max_tokens=400,
            seed=seed,
        )
        assert reason == "stop", text[-300:]
        assert isinstance(json.loads(text), dict)


def test_a_banned_token_the_grammar_needs_is_still_written(oai: openai.OpenAI) -> None:
    """logit_bias -100 bans a token; when the grammar allows nothing else (an object starts with
    "{"), the grammar wins instead of the request failing."""
    from parallama_runtime.demo_model import _vocabulary

    braces = {str(i): -100 for i, text in enumerate(_vocabulary()[0]) if text in (b"{", b"<0x7B>")}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    text, reason = _openai_chat(
        oai,
        response_format={"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}},
        logit_bias=braces,
        max_tokens=100,
    )
    assert reason == "stop"
    validate(text, schema)


def test_openai_text_format_is_free_text(oai: openai.OpenAI) -> None:
    _, reason = _openai_chat(
        oai, response_format={"type": "text"}, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert reason == "length"


def test_openai_unsupported_schema_is_a_400_naming_the_features(oai: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "maximum": 150},
            "ids": {"type": "array", "uniqueItems": True},
        },
        "additionalProperties": False,
    }
    with pytest.raises(openai.BadRequestError) as caught:
        _openai_chat(
            oai,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": schema, "strict": True},
            },
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "response_format"
    assert "properties.age.maximum" in error["message"] and "properties.ids.uniqueItems" in error["message"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("json", "must be an object"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": "yes"}}, "strict"),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "n", "extra": 1}}, "json_schema.extra"),
        ({"type": "text", "schema": {}}, "response_format.schema"),
    ],
)
def test_openai_malformed_response_format_is_a_400(
    structured_server: serve.BackgroundServer, value: Any, words: str
) -> None:
    status, body = post_json(
        structured_server.url + "/v1/chat/completions",
        {"model": SERVED_NAME, "messages": CHAT, "response_format": value, "max_tokens": 4},
        timeout=120,
    )
    assert status == 400, body
    assert body["error"]["param"] == "response_format"
    assert words in body["error"]["message"]


def test_llama_cpp_servers_json_object_schema_is_honoured(structured_server: serve.BackgroundServer) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    status, body = post_json(
        structured_server.url + "/v1/chat/completions",
        {
            "model": SERVED_NAME,
            "messages": CHAT,
            "response_format": {"type": "json_object", "schema": schema},
            "max_tokens": 100,
        },
        timeout=120,
    )
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "stop"
    validate(body["choices"][0]["message"]["content"], schema)


# ------------------------------------------------------------------ the walker (no llama)


@pytest.mark.parametrize(
    ("schema", "features"),
    [
        ({"type": "integer", "minimum": 0, "maximum": 9}, ["minimum", "maximum"]),
        ({"type": "number", "exclusiveMinimum": 0, "multipleOf": 2}, ["exclusiveMinimum", "multipleOf"]),
        (
            {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}},
            ["properties.age.minimum"],
        ),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, ["uniqueItems"]),
        ({"type": "array", "items": {}, "contains": {"const": 1}}, ["contains"]),
        ({"not": {"type": "null"}}, ["not"]),
        ({"type": "string", "if": {}, "then": {}, "else": {}}, ["if", "then", "else"]),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, ["dependentRequired"]),
        ({"type": "object", "dependentSchemas": {"a": {}}}, ["dependentSchemas"]),
        ({"type": "object", "patternProperties": {"^x": {}}}, ["patternProperties"]),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, ["propertyNames"]),
        ({"type": "object", "minProperties": 1}, ["minProperties"]),
        ({"type": "object", "properties": {"a": {}}, "maxProperties": 0}, ["maxProperties"]),
        ({"type": "object", "unevaluatedProperties": False}, ["unevaluatedProperties"]),
        ({"$ref": "https://example.com/schema.json"}, ["$ref"]),
        ({"$ref": "#/$defs/missing"}, ["$ref"]),
        ({"type": "string", "format": "email"}, ["format"]),
        ({"type": "string", "format": "uri", "maxLength": 9}, ["format"]),
        ({"type": "string", "pattern": "^(?=a)a$"}, ["pattern"]),
        ({"type": "string", "pattern": "^\\D$"}, ["pattern"]),
        ({"type": "string", "pattern": "^a$", "maxLength": 3}, ["maxLength"]),
        ({"type": "string", "maxLength": REPETITION_LIMIT + 1}, ["maxLength"]),
        ({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {"type": "string"}}}, ["maxLength"]),
        ({"anyOf": [{"type": "string"}], "type": "string", "minLength": 2}, ["type", "minLength"]),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, ["oneOf"]),
        ({"oneOf": [{"type": "object"}, {"type": "object", "properties": {"a": {}}}]}, ["oneOf"]),
        ({"enum": ["ab", "c"], "minLength": 2}, ["minLength"]),
        ({"const": 3, "type": "string"}, ["const"]),
        (
            {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
            ["additionalProperties"],
        ),
        ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, ["required"]),
        ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, ["allOf[0]", "allOf[1].maxLength", "allOf[1]"]),
        (
            {"type": "object", "properties": {"a": {"type": "string", "nullable": True}}},
            ["properties.a.nullable"],
        ),
        ({"minimum": 3}, ["minimum"]),
        ({"type": "decimal"}, ["type"]),
        ({"properties": {"a": {"$id": "inner", "type": "null"}}}, ["properties.a.$id"]),
    ],
)
def test_unsupported_keywords_are_named_with_their_path(schema: dict[str, Any], features: list[str]) -> None:
    with pytest.raises(UnsupportedSchemaError) as caught:
        json_schema_grammar(schema)
    assert caught.value.features == features


def test_annotations_and_supported_keywords_pass() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.com/thing",
        "$comment": "c",
        "x-vendor": 1,
        "title": "t",
        "description": "d",
        "examples": [{}],
        "default": {},
        "type": "object",
        "properties": {
            "a": {"type": ["string", "null"], "maxLength": 3, "readOnly": True, "deprecated": True},
            "b": {"type": "integer", "maxLength": 3},  # a string keyword: no constraint on an integer
            "c": {
                "type": "array",
                "items": {"type": "boolean"},
                "minItems": 1,
                "maxItems": 2,
                "uniqueItems": False,
            },
            "d": {"oneOf": [{"const": 1}, {"const": "1"}], "discriminator": {"propertyName": "x"}},
            "e": {"$ref": "#/definitions/e", "description": "beside a $ref: only an annotation"},
            "f": {"type": "object", "additionalProperties": True},
            "g": {"allOf": [{"$ref": "#/definitions/e"}]},
        },
        "required": ["a"],
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 7,
        "definitions": {"e": {"enum": ["x"], "writeOnly": True}},
    }
    assert "root ::=" in json_schema_grammar(schema)


def test_a_discriminated_oneof_passes_and_an_ambiguous_one_does_not() -> None:
    def variant(tag: str, extra: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"kind": {"const": tag}, extra: {"type": "integer"}},
            "required": ["kind", extra],
        }

    json_schema_grammar({"oneOf": [variant("a", "x"), variant("b", "y")]})
    with pytest.raises(UnsupportedSchemaError):
        json_schema_grammar({"oneOf": [variant("a", "x"), variant("a", "y")]})


def test_the_walker_copies_what_the_converter_mishandles() -> None:
    walker = SchemaWalker(
        {
            "type": ["integer", "null"],
            "description": "dropped",
            "$defs": {"n": {"enum": [1, "x", None], "type": "integer"}},
        }
    )
    assert walker.normalized() == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    walker = SchemaWalker(
        {
            "type": "object",
            "properties": {"n": {"$ref": "#/$defs/n"}},
            "$defs": {"n": {"enum": [1, "x"], "type": "integer"}},
        }
    )
    assert walker.normalized()["$defs"] == {"ref0": {"enum": [1]}}
    assert walker.normalized()["properties"]["n"] == {"$ref": "#/$defs/ref0"}
    assert SchemaWalker({"title": "anything"}).normalized() == {"type": "object"}


def test_json_grammar_is_llama_cpps_json_gbnf() -> None:
    from llama_cpp.llama_grammar import JSON_GBNF

    assert JSON_GRAMMAR.strip() == JSON_GBNF.strip()
    assert 'ws ::= | " " | "\\n" [ \\t]{0,20}' in JSON_GRAMMAR  # bounded whitespace


@pytest.mark.parametrize(
    ("pattern", "translated"),
    [
        ("^[A-Z]{2}-\\d{3}$", "^([\\x41-\\x5A]{2}-[\\x30-\\x39]{3})$"),
        ("ab|cd", "^(ab|cd)$"),
        ("^a\\.b$", "^(a[\\x2E]b)$"),
        ("^(?:x|y)+?$", "^((x|y)+)$"),
        ("^[^,]$", "^([^\\x2C\\x00-\\x1F\\x22\\x5C])$"),
        ("^[ -~]$", "^([\\x20-\\x21\\x23-\\x5B\\x5D-\\x7E])$"),
    ],
)
def test_pattern_translation(pattern: str, translated: str) -> None:
    assert translate_pattern(pattern) == translated


@pytest.mark.parametrize(
    "pattern",
    [
        "^(?=a)$",
        "^(a)\\1$",
        "^\\bx$",
        "^a^b$",
        "^\\S+$",
        '^"$',
        "^\\\\$",
        "^[\\n\\t]$",
        "^a{2000}$",
        "^[^\\d]$",
        "(",
        "x{",
    ],
)
def test_untranslatable_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError):
        translate_pattern(pattern)


_JSON_UNSAFE = re.compile(r'["\\\x00-\x1f]')


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
@pytest.mark.parametrize(
    "pattern",
    [
        "^[A-Z]{2}-\\d{3}$",
        "\\w+@\\w+\\.com",
        "^.{0,8}$",
        "^[^,;]{1,4}(,[^,;]{1,4})*$",
        "^(red|green|blue)\\s?\\d*$",
        "^[\\u00e0-\\u00ff\\-_ ]{2,5}$",
        "^x?y+z*$",
    ],
)
def test_translated_patterns_match_only_what_the_pattern_matches(pattern: str, data: st.DataObject) -> None:
    """The translation is itself a Python regex: every string it matches fully is matched by the
    original (jsonschema's re.search) and needs no escaping in JSON."""
    translated = translate_pattern(pattern)
    text = data.draw(st.from_regex(translated, fullmatch=True))
    assert re.search(pattern, text)
    assert not _JSON_UNSAFE.search(text)


# ------------------------------------------------------------------ grammars, drawn by llama.cpp


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[Any]:
    """The demo model's vocabulary alone (no weights): enough for llama.cpp's grammar engine."""
    import llama_cpp as lib

    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(model_path).encode(), params)
    assert model
    yield lib.llama_model_get_vocab(model)
    lib.llama_model_free(model)


def _piece(lib: Any, vocab: Any, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    length = lib.llama_token_to_piece(vocab, token, buf, 64, 0, False)
    return buf.raw[: max(length, 0)]


def draw(vocab: Any, grammar: str, rng: random.Random, limit: int = 2000) -> str | None:
    """A random string of ``grammar``: uniform over the tokens llama.cpp's grammar allows next
    (those that keep the text valid UTF-8, as the engine does), ending where it may with
    probability 0.3. None if it has not ended after ``limit`` tokens."""
    import llama_cpp as lib

    n_vocab = lib.llama_vocab_n_tokens(vocab)
    handle = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    assert handle, "llama.cpp refused the grammar"
    candidates = Candidates(lib, n_vocab)
    out = b""
    try:
        for _ in range(limit):
            array = candidates.fill([0.0] * n_vocab)
            lib.llama_sampler_apply(handle, ctypes.byref(array))
            allowed = [t for t in range(n_vocab) if candidates.data[t].logit != -math.inf]
            ends = [t for t in allowed if lib.llama_vocab_is_eog(vocab, t)]
            if ends and rng.random() < 0.3:
                return out.decode()
            options = [t for t in allowed if t not in ends and _utf8_prefix(out + _piece(lib, vocab, t))]
            assert options or ends, "the grammar reached a dead end"
            if not options:
                return out.decode()
            token = rng.choice(options)
            lib.llama_sampler_accept(handle, token)
            out += _piece(lib, vocab, token)
        return None
    finally:
        lib.llama_sampler_free(handle)


DRAWN_SCHEMAS: list[dict[str, Any]] = [
    SCHEMA,
    # literals the stock converter wrote into broken GBNF (quotes, backslashes, control characters)
    {"enum": ['say "hi"', "C:\\dir", "tab\there", "line\nbreak", "é", None, 1.5, True]},
    {"type": "object", "properties": {'we"ird\\key': {"const": "x"}}, "required": ['we"ird\\key']},
    # a $defs name that is also one of the converter's own rules, and one used twice
    {
        "$defs": {"string": {"enum": ["x", "y"]}, "space": {"type": "integer"}},
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/string"},
            "b": {"type": "string", "maxLength": 2},
            "c": {"$ref": "#/$defs/string"},
            "d": {"$ref": "#/$defs/space"},
        },
        "required": ["a", "b", "c", "d"],
    },
    # recursion through a root $ref
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "boolean"},
                    "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
            }
        },
        "$ref": "#/$defs/node",
    },
    {"type": ["string", "null"], "minLength": 1, "maxLength": 4},
    {"type": "string", "pattern": "ab|cd"},  # the stock converter left the alternation outside the quotes
    {"type": "string", "pattern": "^[^,]{1,5}\\.x$"},
    {"type": "string", "pattern": "^.{0,6}$"},
    {"type": "string", "format": "date"},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "time"},
    {"type": "string", "format": "uuid"},
    {"type": "string", "maxLength": 5},  # raw control characters: the stock rule let them through
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "number"}], "items": False},
    {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "null"}, {"type": "boolean"}]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {
        "allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"$ref": "#/$defs/b"}],
        "$defs": {"b": {"type": "object", "properties": {"b": {"type": "null"}}}},
    },
    {"oneOf": [{"type": "string", "maxLength": 2}, {"type": "boolean"}, {"type": "null"}]},
    {"type": "object", "properties": {}, "additionalProperties": False, "maxProperties": 0},
    {"description": "anything"},
]


@pytest.mark.parametrize("schema", DRAWN_SCHEMAS, ids=range(len(DRAWN_SCHEMAS)))
def test_every_string_a_schemas_grammar_allows_validates(vocab: Any, schema: dict[str, Any]) -> None:
    grammar = json_schema_grammar(schema)
    rng = random.Random(0)
    finished = 0
    for _ in range(40):
        text = draw(vocab, grammar, rng)
        if text is None:
            continue
        finished += 1
        validate(text, schema)
    assert finished >= 30


def test_the_limits_compile(vocab: Any) -> None:
    """The largest counts the walker lets through are within llama.cpp's repetition limit."""
    import llama_cpp as lib

    for schema in (
        {"type": "string", "maxLength": REPETITION_LIMIT},
        {"type": "string", "minLength": REPETITION_LIMIT, "maxLength": 2 * REPETITION_LIMIT},
        {
            "type": "array",
            "items": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "maxItems": REPETITION_LIMIT,
        },
        {"type": "string", "pattern": f"^a{{0,{REPETITION_LIMIT}}}[b-z]{{{REPETITION_LIMIT}}}$"},
    ):
        handle = lib.llama_sampler_init_grammar(vocab, json_schema_grammar(schema).encode(), b"root")
        assert handle, schema
        lib.llama_sampler_free(handle)


# ------------------------------------------------------------------ the engine


def test_group_nesting() -> None:
    assert group_nesting('root ::= ("(" [()] <(> # (((\n ("a" ("b")))') == 3
    assert group_nesting('root ::= "\\"(("') == 0


def test_utf8_tracking() -> None:
    assert _utf8_prefix("é".encode()[:1]) and _utf8_prefix(b"ab")
    assert not _utf8_prefix(b"\xc1\x81") and not _utf8_prefix(b"\xf9") and not _utf8_prefix(b"\xed\xa0\x80")
    assert _complete_length("aé".encode()[:2]) == 1
    assert _complete_length("aé€".encode()) == len("aé€".encode())
    assert _complete_length("a€".encode()[:3]) == 1


class _Logits:
    """llama_cpp with ``llama_get_logits_ith`` answering a fixed row: GrammarSampler without a model."""

    def __init__(self, values: list[float]) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._row = (ctypes.c_float * len(values))(*values)

    def llama_get_logits_ith(self, ctx: Any, index: int) -> Any:
        return ctypes.cast(self._row, ctypes.POINTER(ctypes.c_float))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


def test_a_grammar_left_without_a_token_ends_the_request_instead_of_the_process(vocab: Any) -> None:
    """A chain that bans every token leaves the grammar nothing it allows: sample says so (None)
    rather than accepting a token the grammar rejects (which aborts the process)."""
    import llama_cpp as lib

    n_vocab = lib.llama_vocab_n_tokens(vocab)
    fake = _Logits([0.0] * n_vocab)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    biases = (lib.llama_logit_bias * n_vocab)(*(lib.llama_logit_bias(t, -math.inf) for t in range(n_vocab)))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(n_vocab, n_vocab, biases))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(1))
    grammar = GrammarSampler.create(fake, vocab, 'root ::= "{}"')
    try:
        assert (
            grammar.sample(chain, None, 0, Candidates(fake, n_vocab), lambda t: _piece(lib, vocab, t)) is None
        )
    finally:
        grammar.free()
        lib.llama_sampler_free(chain)


def test_a_grammar_corrects_the_chains_choice(vocab: Any) -> None:
    """The model's favourite token does not fit: the token drawn is one the grammar allows."""
    import llama_cpp as lib

    n_vocab = lib.llama_vocab_n_tokens(vocab)
    pieces = [_piece(lib, vocab, t) for t in range(n_vocab)]
    values = [0.0] * n_vocab
    values[pieces.index(b"x")] = 50.0  # the model wants "x"
    fake = _Logits(values)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    grammar = GrammarSampler.create(fake, vocab, 'root ::= "y" | "z"')
    try:
        token = grammar.sample(chain, None, 0, Candidates(fake, n_vocab), pieces.__getitem__)
        assert token is not None and pieces[token] in (b"y", b"z")
    finally:
        grammar.free()
        lib.llama_sampler_free(chain)


async def test_the_engine_refuses_a_bad_grammar_at_submit(model_path: Path) -> None:
    engine = Engine(EngineConfig(str(model_path), num_parallel=1, num_ctx=256, threads=2))
    engine.load()
    engine.start()
    try:
        prompt = engine.tokenize("hi")
        for bad in (
            "root ::= undefined-rule",
            'root ::= "a',
            'x ::= "a"',
            "root ::= " + "(" * (MAX_GROUP_NESTING + 1) + '"a"' + ")" * (MAX_GROUP_NESTING + 1),
        ):
            with pytest.raises(GrammarError):
                engine.submit(prompt, SamplingParams(grammar=bad))
        assert engine.in_flight() == 0
        handle = engine.submit(prompt, SamplingParams(grammar='root ::= "ok"', max_tokens=20, seed=1))
        parts = [event.text async for event in handle if isinstance(event, TextChunk)]
        assert "".join(parts) == "ok"
    finally:
        await asyncio.to_thread(engine.close)

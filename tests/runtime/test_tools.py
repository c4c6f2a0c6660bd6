"""Tool calling: tools offered through real chat templates, calls parsed in each format, forced calls
constrained by grammar, OpenAI's and Ollama's shapes through their official clients.

The models have random weights: a forced call (tool_choice required or a named function) is
guaranteed by the grammar, so its arguments must validate against the tool's parameters whatever the
model is; free generation (auto) almost never produces a call, so those tests rest on what the
prompt holds (its token count) and on the shapes, not on what the model says. The tools' parameters
are enums and booleans, so a forced call is short whatever the model prefers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest
from parallama_runtime import serve
from parallama_runtime.api import tools as tools_module
from parallama_runtime.api.common import ApiError
from parallama_runtime.api.structured import UnsupportedSchemaError
from parallama_runtime.api.tool_formats import (
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolCallParser,
    ToolFormat,
    detect_format,
    namespace_grammar,
)
from parallama_runtime.api.tools import (
    ollama_tool_calls,
    ollama_tools,
    openai_tool_call_deltas,
    openai_tools,
)
from parallama_runtime.demo_model import CHAT_TEMPLATE, DEMO_SHAPE, write_model
from parallama_runtime.engine.chat_template import TemplateError, render_chat, template_caps
from runtime_helpers import SERVED_NAME, settings_for

TEMPLATES = Path(__file__).parent / "chat_templates"
QWEN = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
LLAMA = (TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
NEMO = (TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "forecast": {"type": "boolean"},
    },
    "required": ["city", "unit", "forecast"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME_PARAMETERS},
    },
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
NAMES = frozenset(PARAMETERS)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _turn(call_id: str) -> list[dict[str, Any]]:
    """A tool-result turn in OpenAI's shape: the call (arguments as a JSON string) and its result."""
    return [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius", "forecast": false}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "22 degrees and sunny"},
    ]


# ------------------------------------------------------------------ parsing the formats


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (
            HERMES,
            'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            "\n</tool_call>\n"
            '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}\n</tool_call>',
            "Let me look.",
            [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})],
        ),
        # the marker is a special token the detokenizer leaves out: the JSON at the start is the call
        (
            HERMES,
            ' {"name": "get_time", "arguments": {"zone": "CET"}}',
            None,
            [("get_time", {"zone": "CET"})],
        ),
        (HERMES, '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", {})]),
        (
            LLAMA3,
            '{"name": "get_weather", "parameters": {"city": "Lima"}}',
            None,
            [("get_weather", {"city": "Lima"})],
        ),
        (
            LLAMA3,
            '<|python_tag|>{"name": "get_time", "parameters": {}}; '
            '{"name": "get_time", "parameters": {"zone": "JST"}}',
            None,
            [("get_time", {}), ("get_time", {"zone": "JST"})],
        ),
        (
            MISTRAL,
            '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}, '
            '{"name": "get_weather", "arguments": {}}]',
            None,
            [("get_time", {"zone": "UTC"}), ("get_weather", {})],
        ),
        (
            MISTRAL,
            '[{"name": "get_time", "arguments": {"zone": "JST"}}]',
            None,
            [("get_time", {"zone": "JST"})],
        ),
    ],
)
def test_calls_are_parsed_in_each_format(
    fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    got_content, got = ToolCallParser(fmt, NAMES).parse(text)
    assert got_content == content
    assert [(call.name, dict(call.arguments)) for call in got] == calls
    assert len({call.id for call in got}) == len(got)
    for call in got:
        assert json.loads(call.arguments_json) == call.arguments


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (HERMES, "plain text, no call\n"),
        (HERMES, '{"city": "Paris"} is JSON but not a call'),
        (HERMES, "a < b, <tool_ is no marker, <tool_call>not json</tool_call> and the rest"),
        (HERMES, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),  # not a declared tool
        (HERMES, '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>'),  # arguments not an object
        (LLAMA3, 'Sure: {"name": "get_time", "parameters": {}}'),  # a Llama call is the whole answer
        (MISTRAL, "Hello [TOOL_CALLS] and then nothing"),
    ],
)
def test_what_is_not_a_call_stays_content_unchanged(fmt: ToolFormat, text: str) -> None:
    assert ToolCallParser(fmt, NAMES).parse(text) == (text, [])


def test_without_parallel_calls_only_the_first_is_kept() -> None:
    text = (
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "get_weather"}</tool_call>'
    )
    _, calls = ToolCallParser(HERMES, NAMES, parallel=False).parse(text)
    assert [call.name for call in calls] == ["get_time"]


def test_mistral_ids_are_nine_alphanumerics() -> None:
    """Mistral's templates refuse any other id when the call comes back in the next request."""
    _, calls = ToolCallParser(MISTRAL, NAMES).parse('[{"name": "get_time", "arguments": {}}]')
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    _, calls = ToolCallParser(HERMES, NAMES).parse('{"name": "get_time", "arguments": {}}')
    assert calls[0].id.startswith("call_")


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (
            HERMES,
            'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\nDone.',
        ),
        (HERMES, '\n\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}'),
        (HERMES, "no call here, but < and <tool and <tool_c at the end <tool_ca"),
        (LLAMA3, '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}'),
        (LLAMA3, '{"answer": 42}'),
        (MISTRAL, 'Here: [TOOL_CALLS][{"name": "get_time", "arguments": {}}]'),
    ],
)
def test_streaming_finds_the_same_calls_and_never_sends_call_text_as_content(
    fmt: ToolFormat, text: str
) -> None:
    whole_content, whole_calls = ToolCallParser(fmt, NAMES).parse(text)
    rng = random.Random(7)
    for _ in range(30):
        parser = ToolCallParser(fmt, NAMES)
        sent, calls, at = [], [], 0
        while at < len(text):
            size = rng.randint(1, 5)
            content, found = parser.feed(text[at : at + size])
            sent.append(content)
            calls += found
            at += size
        content, found = parser.finish()
        sent.append(content)
        calls += found
        streamed = "".join(sent)
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
        if whole_calls:
            assert (streamed.strip() or None) == whole_content
            assert (
                fmt.marker not in streamed
                and '"arguments"' not in streamed
                and '"parameters"' not in streamed
            )
        else:
            assert streamed == text


# ------------------------------------------------------------------ templates


def test_formats_are_detected_from_real_templates() -> None:
    assert detect_format(QWEN) is HERMES
    assert detect_format(LLAMA) is LLAMA3
    assert detect_format(NEMO) is MISTRAL
    assert detect_format(CHAT_TEMPLATE) is HERMES  # not tool-aware: told Hermes' form
    assert detect_format(None) is HERMES
    assert template_caps(QWEN).tools and template_caps(QWEN).tool_calls
    assert not template_caps(CHAT_TEMPLATE).tools


def test_a_tool_result_turn_renders_through_qwen() -> None:
    prompt = render_chat(QWEN, _turn("call_1"), tools=TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    # the arguments came as a JSON string and are written by the template as an object
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius", "forecast": false}}\n</tool_call><|im_end|>'
    ) in prompt
    assert "<|im_start|>user\n<tool_response>\n22 degrees and sunny\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_tool_result_turn_renders_through_llama_and_mistral() -> None:
    llama = render_chat(LLAMA, _turn("call_1"), tools=TOOLS, bos_token="<|begin_of_text|>")
    assert '"name": "get_time"' in llama  # the tools, in the first user message
    assert (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius", "forecast": false}}'
        in llama
    )
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"22 degrees and sunny"<|eot_id|>' in llama
    nemo = render_chat(NEMO, _turn("a1B2c3D4e"), tools=TOOLS, eos_token="</s>")
    assert '[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather"' in nemo
    assert '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"' in nemo
    assert '[TOOL_RESULTS]{"content": 22 degrees and sunny, "call_id": "a1B2c3D4e"}[/TOOL_RESULTS]' in nemo


def test_a_template_without_tools_gets_them_as_hermes_text() -> None:
    prompt = render_chat(CHAT_TEMPLATE, _turn("call_1"), tools=TOOLS)
    system, rest = prompt.split("<user>", 1)
    assert system.startswith("<system># Tools") and '"name": "get_time"' in system and "<tool_call>" in system
    assert '<assistant><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in rest
    assert "<tool><tool_response>\n22 degrees and sunny\n</tool_response>" in rest


def test_a_template_with_only_user_and_assistant_gets_results_as_a_user_turn() -> None:
    strict = (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('only user and assistant') }}{% endif %}"
        "[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    )
    messages = [*_turn("call_1"), {"role": "tool", "tool_call_id": "call_2", "content": "second"}]
    prompt = render_chat(strict, messages, tools=TOOLS)
    assert prompt.startswith("[user]# Tools")  # no system role: the tools open the first user turn
    assert prompt.count("[user]") == 2  # both results in one user turn
    assert "[user]<tool_response>\n22 degrees and sunny\n</tool_response>\n<tool_response>\nsecond" in prompt


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[]"}}],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]},
            "messages[1].tool_calls[0].function.name",
        ),
        (
            {"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]},
            "messages[1].tool_calls[0].type",
        ),
        ({"role": "assistant", "tool_calls": {"name": "f"}}, "messages[1].tool_calls"),
        (
            {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
            "messages[1].tool_calls",
        ),
        ({"role": "tool", "content": "x", "tool_call_id": 7}, "messages[1].tool_call_id"),
    ],
)
def test_bad_tool_messages_name_the_field(message: dict[str, Any], param: str) -> None:
    with pytest.raises(TemplateError) as caught:
        render_chat(QWEN, [*ASK, message])
    assert caught.value.param == param
    assert param in str(caught.value)


# ------------------------------------------------------------------ requests, grammars, shapes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]},
            "tools[0].function.returns",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tool_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        openai_tools(body, QWEN)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_tool_choice_semantics() -> None:
    assert openai_tools({}, QWEN) is None
    assert openai_tools({"tool_choice": "none"}, QWEN) is None
    auto = openai_tools({"tools": TOOLS}, QWEN)
    assert auto is not None and auto.choice == "auto" and auto.parses and auto.offered
    assert auto.grammar(None) is None  # free generation
    none = openai_tools({"tools": TOOLS, "tool_choice": "none"}, QWEN)
    assert none is not None and not none.parses and none.offered is None and none.grammar(None) is None
    named = openai_tools(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, QWEN
    )
    assert named is not None and named.named == "get_time"
    grammar = named.grammar(None)
    assert grammar is not None and '\\"get_time\\"' in grammar and "get_weather" not in grammar
    required = openai_tools({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, NEMO)
    assert required is not None and required.format is MISTRAL and not required.parallel
    grammar = required.grammar(None)
    assert grammar is not None and grammar.startswith('root ::= "[TOOL_CALLS][" tool-call "]"')
    ollama_request = ollama_tools({"tools": TOOLS}, QWEN)
    assert ollama_request is not None and ollama_request.choice == "auto"
    assert ollama_tools({"tools": []}, QWEN) is None


def test_schemas_are_namespaced_into_one_grammar() -> None:
    gbnf = (
        'root ::= "{" space item ("," space item){0,3} "}"\nitem ::= [a-z-]+ "root" space\nspace ::= " "?\n'
    )
    renamed = namespace_grammar(gbnf, "t0-")
    assert renamed.splitlines() == [
        't0-root ::= "{" t0-space t0-item ("," t0-space t0-item){0,3} "}"',
        't0-item ::= [a-z-]+ "root" t0-space',
        't0-space ::= " "?',
    ]
    required = openai_tools({"tools": TOOLS, "tool_choice": "required"}, QWEN)
    assert required is not None
    grammar = required.grammar('root ::= "{" space "}"\nspace ::= " "?\n')
    assert grammar is not None
    defined = [line.split("::=")[0].strip() for line in grammar.splitlines() if "::=" in line]
    assert len(defined) == len(set(defined)), "each rule is defined once"
    auto = openai_tools({"tools": TOOLS}, QWEN)
    assert auto is not None
    combined = auto.grammar('root ::= "{" space "}"\nspace ::= " "?\n')
    assert combined is not None and combined.startswith("root ::= calls | content-root")
    assert "content-space ::=" in combined and "tool0-root ::=" in combined and "tool1-root ::=" in combined


def test_a_schema_the_grammar_cannot_express_is_a_400_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(schema: Any) -> str:
        raise UnsupportedSchemaError(["properties.city.pattern"])

    monkeypatch.setattr(tools_module, "json_schema_grammar", refuse)
    with pytest.raises(ApiError) as caught:
        openai_tools({"tools": TOOLS, "tool_choice": "required"}, QWEN)
    assert caught.value.param == "tools[0].function.parameters"
    assert "properties.city.pattern" in caught.value.message
    assert openai_tools({"tools": TOOLS}, QWEN) is not None  # auto constrains nothing: no grammar needed


def test_response_shapes_are_what_the_clients_read() -> None:
    _, calls = ToolCallParser(HERMES, NAMES).parse(
        '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    )
    message = ollama.Message.model_validate(
        {"role": "assistant", "content": "", "tool_calls": ollama_tool_calls(calls)}
    )
    assert message.tool_calls is not None
    assert [(c.function.name, dict(c.function.arguments)) for c in message.tool_calls] == [
        ("get_time", {"zone": "UTC"}),
        ("get_weather", {}),
    ]
    deltas = openai_tool_call_deltas(calls, 3)
    assert [d["index"] for d in deltas] == [3, 3, 4, 4]
    assert deltas[0] == {
        "index": 3,
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "get_time", "arguments": ""},
    }
    assert json.loads(deltas[1]["function"]["arguments"]) == {"zone": "UTC"}


# ------------------------------------------------------------------ through real runtimes


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], serve.BackgroundServer]]:
    """One runtime per chat template, started on first use: 1 slot of 4096 tokens (the byte-level
    vocabulary makes the tool prompts ~1500 tokens)."""
    pytest.importorskip("llama_cpp")
    folder = tmp_path_factory.mktemp("tool-models")
    running: dict[str, serve.BackgroundServer] = {}
    templates = {"demo": CHAT_TEMPLATE, "qwen": QWEN, "llama": LLAMA, "nemo": NEMO}

    def get(name: str) -> serve.BackgroundServer:
        if name not in running:
            model = write_model(folder / f"{name}.gguf", DEMO_SHAPE, seed=7, chat_template=templates[name])
            running[name] = serve.BackgroundServer(
                settings_for(model, "--parallel", "1", "--num-ctx", "4096", "--served-name", SERVED_NAME)
            ).start()
        return running[name]

    yield get
    for server in running.values():
        server.stop()


def _client(server: serve.BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _check_call(name: str, arguments: Any) -> None:
    assert name in PARAMETERS
    jsonschema.validate(arguments, PARAMETERS[name])


def _streamed(stream: Any) -> tuple[str, dict[int, dict[str, Any]], str | None]:
    """Content, calls by index (id, name, arguments concatenated) and finish_reason of a stream."""
    content, calls, reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id and delta.type == "function" and delta.function.name
                assert delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and not delta.function.name
                calls[delta.index]["arguments"] += delta.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, calls, reason


@pytest.mark.llama
@pytest.mark.parametrize("template", ["demo", "qwen", "llama", "nemo"])
def test_a_required_call_validates_in_each_format(
    servers: Callable[[str], serve.BackgroundServer], template: str
) -> None:
    client = _client(servers(template))
    answer = client.chat.completions.create(
        model=SERVED_NAME,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        seed=1,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].type == "function" and calls[0].id
    _check_call(calls[0].function.name, json.loads(calls[0].function.arguments))

    # the call goes back with its result: the next turn renders through the model's template
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "22 degrees and sunny"},
    ]
    follow = client.chat.completions.create(model=SERVED_NAME, messages=messages, tools=TOOLS, max_tokens=4)
    assert follow.usage is not None and follow.usage.prompt_tokens > answer.usage.prompt_tokens


@pytest.mark.llama
@pytest.mark.parametrize("template", ["demo", "qwen"])
def test_a_named_call_streams_as_openai_does(
    servers: Callable[[str], serve.BackgroundServer], template: str
) -> None:
    client = _client(servers(template))
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=300,
        stream=True,
    )
    content, calls, reason = _streamed(stream)
    assert reason == "tool_calls"
    assert content == ""  # the call's text never arrives as content
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    _check_call("get_time", json.loads(calls[0]["arguments"]))


@pytest.mark.llama
def test_parallel_required_calls_stream_with_their_indices(
    servers: Callable[[str], serve.BackgroundServer],
) -> None:
    """``parallel_tool_calls`` (the default) lets the grammar write more calls; +100 on the end
    token makes the model stop as soon as the grammar allows it (after the first call), so the
    answer is short whatever the random model prefers."""
    client = _client(servers("qwen"))
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        logit_bias={"2": 100},  # </s>: the generated vocabulary's end token
        max_tokens=300,
        stream=True,
    )
    content, calls, reason = _streamed(stream)
    assert reason == "tool_calls" and content == ""
    assert sorted(calls) == list(range(len(calls))) and calls
    for call in calls.values():
        _check_call(call["name"], json.loads(call["arguments"]))


@pytest.mark.llama
def test_auto_offers_the_tools_and_none_does_not(servers: Callable[[str], serve.BackgroundServer]) -> None:
    client = _client(servers("qwen"))
    plain = client.chat.completions.create(model=SERVED_NAME, messages=ASK, max_tokens=4)
    none = client.chat.completions.create(
        model=SERVED_NAME,
        messages=ASK,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=4,
    )
    auto = client.chat.completions.create(model=SERVED_NAME, messages=ASK, tools=TOOLS, max_tokens=4)
    assert plain.usage and none.usage and auto.usage
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 200  # the two tools' declarations
    for answer in (none, auto):
        choice = answer.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        for call in choice.message.tool_calls or []:  # a random model's call is still a valid one
            _check_call(call.function.name, json.loads(call.function.arguments))
    assert none.choices[0].message.tool_calls is None


@pytest.mark.llama
def test_bad_tool_requests_are_400_naming_the_field(servers: Callable[[str], serve.BackgroundServer]) -> None:
    client = _client(servers("demo"))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
    ]
    for extra, param in cases:
        request: dict[str, Any] = {"model": SERVED_NAME, "messages": ASK, "max_tokens": 2, **extra}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**request)
        assert caught.value.param == param, caught.value
    ollama_client = ollama.Client(host=servers("demo").url)
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.chat(
            model=SERVED_NAME,
            messages=ASK,
            tools=[{"type": "function", "function": {"name": ""}}],
            stream=False,
        )
    assert refused.value.status_code == 400 and "tools[0].function.name" in refused.value.error


def _call_schema(name: str) -> dict[str, Any]:
    """A JSON schema of one call's object, for Ollama's ``format``."""
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [name]}, "arguments": PARAMETERS[name]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


@pytest.mark.llama
@pytest.mark.parametrize("stream", [False, True])
def test_ollama_tool_calls_come_back_as_objects(
    servers: Callable[[str], serve.BackgroundServer], stream: bool
) -> None:
    """Ollama has no tool_choice, so the call is made certain with Ollama's own ``format``: a schema
    of the call's JSON. Under tools, ``format`` constrains the answer to a call or that schema, and
    an answer that is a call's JSON is a call in the Hermes format (the marker left out)."""
    client = ollama.Client(host=servers("qwen").url)
    request: dict[str, Any] = {
        "model": SERVED_NAME,
        "messages": ASK,
        "tools": TOOLS,
        "format": _call_schema("get_weather"),
        "options": {"num_predict": 300, "seed": 3},
    }
    if stream:
        parts = list(client.chat(**request, stream=True))
        calls = [call for part in parts for call in (part.message.tool_calls or [])]
        content = "".join(part.message.content or "" for part in parts)
        assert parts[-1].done and parts[-1].done_reason == "stop"
    else:
        answer = client.chat(**request, stream=False)
        calls = list(answer.message.tool_calls or [])
        content = answer.message.content or ""
    assert content == ""
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    _check_call("get_weather", dict(calls[0].function.arguments))


@pytest.mark.llama
def test_an_ollama_tool_result_turn_renders(servers: Callable[[str], serve.BackgroundServer]) -> None:
    client = ollama.Client(host=servers("qwen").url)
    assert "tools" in (client.show(SERVED_NAME).capabilities or [])  # what clients check before sending tools
    options = {"num_predict": 2}
    before = client.chat(model=SERVED_NAME, messages=ASK, tools=TOOLS, stream=False, options=options)
    turn = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
            ],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "22 degrees and sunny"},
    ]
    after = client.chat(model=SERVED_NAME, messages=turn, tools=TOOLS, stream=False, options=options)
    assert after.prompt_eval_count is not None and before.prompt_eval_count is not None
    rendered = render_chat(QWEN, turn, tools=TOOLS)
    added = len(rendered) - len(render_chat(QWEN, ASK, tools=TOOLS))
    assert after.prompt_eval_count - before.prompt_eval_count == pytest.approx(added, abs=8)


@pytest.mark.llama
def test_auto_beside_a_response_format_answers_a_call_or_that_json(
    servers: Callable[[str], serve.BackgroundServer],
) -> None:
    """Under ``auto`` the grammar allows a call or the asked-for JSON (the two grammars combined,
    their rules namespaced): whichever the model picks, it is valid."""
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    client = _client(servers("qwen"))
    for seed in range(3):
        answer = client.chat.completions.create(
            model=SERVED_NAME,
            messages=ASK,
            tools=TOOLS,
            parallel_tool_calls=False,
            response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
            max_tokens=300,
            seed=seed,
        )
        choice = answer.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
            call = choice.message.tool_calls[0]
            _check_call(call.function.name, json.loads(call.function.arguments))
        else:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), schema)

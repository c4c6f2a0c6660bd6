"""Nothing silently ignored: a field the runtime does not implement is a 400 naming it, in each
API's own error shape, and the fields it implements change what comes back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from parallama_runtime.api.common import ApiError
from parallama_runtime.api.fields import (
    OLLAMA_CHAT,
    OLLAMA_GENERATE,
    OLLAMA_OPTIONS,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    RouteFields,
)
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME, post_json

CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2}
OLLAMA_GEN = {"model": SERVED_NAME, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
OLLAMA_CHAT_BODY = {
    "model": SERVED_NAME,
    "messages": [{"role": "user", "content": "hi"}],
    "stream": False,
    "options": {"num_predict": 2},
}


# ------------------------------------------------------------------ the tables, without a server


@pytest.mark.parametrize(
    ("fields", "body", "named"),
    [
        (OPENAI_CHAT, {"n": 2}, "n"),
        (OPENAI_CHAT, {"frobnicate": 1}, "frobnicate"),
        (OPENAI_CHAT, {"stream_options": {"include_obfuscation": True}}, "stream_options"),
        (OPENAI_CHAT, {"modalities": ["text", "audio"]}, "modalities"),
        (OPENAI_CHAT, {"store": True}, "store"),
        (OPENAI_CHAT, {"functions": [{"name": "f"}]}, "functions"),
        (OPENAI_COMPLETIONS, {"echo": True}, "echo"),
        (OPENAI_COMPLETIONS, {"best_of": 3}, "best_of"),
        (OPENAI_COMPLETIONS, {"suffix": "}"}, "suffix"),
        (OPENAI_COMPLETIONS, {"tools": []}, "tools"),  # a chat field on the completions route
        (OLLAMA_GENERATE, {"images": ["aGk="]}, "images"),
        (OLLAMA_GENERATE, {"template": "{{ .Prompt }}"}, "template"),
        (OLLAMA_GENERATE, {"context": [1, 2, 3]}, "context"),
        (OLLAMA_GENERATE, {"think": True}, "think"),
        (OLLAMA_CHAT, {"prompt": "x"}, "prompt"),
        (OLLAMA_OPTIONS, {"mirostat": 2}, "options.mirostat"),
        (OLLAMA_OPTIONS, {"num_keep": 5}, "options.num_keep"),
        (OLLAMA_OPTIONS, {"tfs_z": 0.5}, "options.tfs_z"),
        (OLLAMA_OPTIONS, {"temprature": 0.1}, "options.temprature"),
    ],
)
def test_refused_fields_name_themselves(fields: RouteFields, body: dict[str, Any], named: str) -> None:
    with pytest.raises(ApiError) as caught:
        fields.check(body)
    assert caught.value.status == 400
    assert caught.value.param == named
    assert named in caught.value.message


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        (
            OPENAI_CHAT,
            {"n": 1, "stream_options": {"include_usage": True}, "user": "u", "service_tier": "auto"},
        ),
        (OPENAI_CHAT, {"modalities": ["text"], "store": False, "audio": None, "seed": 1}),
        (OPENAI_COMPLETIONS, {"echo": False, "best_of": 1, "suffix": ""}),
        (OLLAMA_GENERATE, {"images": [], "think": False, "keep_alive": "5m", "raw": True}),
        (OLLAMA_OPTIONS, {"mirostat": 0, "tfs_z": 1.0, "typical_p": 0.9}),
    ],
)
def test_honoured_values_pass(fields: RouteFields, body: dict[str, Any]) -> None:
    assert fields.check(body) == []


def test_deployment_options_are_returned_for_a_note() -> None:
    assert OLLAMA_OPTIONS.check({"num_ctx": 8192, "num_gpu": 99, "temperature": 0}) == ["num_ctx", "num_gpu"]


def test_the_tables_do_not_overlap() -> None:
    for fields in (OPENAI_CHAT, OPENAI_COMPLETIONS, OLLAMA_GENERATE, OLLAMA_CHAT, OLLAMA_OPTIONS):
        assert not fields.honoured & set(fields.refused_values)
        assert not fields.honoured & fields.deployment
        assert not set(fields.refused_values) & fields.deployment


# ------------------------------------------------------------------ through a real runtime


@pytest.mark.llama
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
        ("/v1/chat/completions", {**CHAT, "frobnicate": True}, "frobnicate"),
        ("/v1/completions", {**COMPLETION, "echo": True}, "echo"),
        ("/api/generate", {**OLLAMA_GEN, "images": ["aGk="]}, "images"),
        ("/api/chat", {**OLLAMA_CHAT_BODY, "think": True}, "think"),
        ("/api/generate", {**OLLAMA_GEN, "options": {"mirostat": 1}}, "options.mirostat"),
    ],
)
def test_unsupported_fields_are_400_in_each_dialect(
    server: BackgroundServer, path: str, body: dict[str, Any], field: str
) -> None:
    status, answer = post_json(server.url + path, body)
    assert status == 400, answer
    if path.startswith("/v1/"):
        assert answer["error"]["param"] == field
        assert field in answer["error"]["message"]
    else:
        assert isinstance(answer["error"], str) and field in answer["error"]


@pytest.mark.llama
def test_the_openai_client_sees_the_refusal(server: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}], n=3)
    assert caught.value.param == "n"


@pytest.mark.llama
def test_logit_bias_forces_and_bans_tokens(server: BackgroundServer) -> None:
    """+100 on two tokens makes greedy decoding pick among them; then -100 on the one it preferred
    bans it even though its raw logit is the higher one, so only the other comes out."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    def greedy(bias: dict[str, int]) -> str:
        answer = client.completions.create(
            model=SERVED_NAME, prompt="hello", max_tokens=6, temperature=0, logit_bias=bias
        )
        return answer.choices[0].text

    engine = server.server.engine
    assert engine is not None and engine.vocab is not None
    q, z = (engine.tokenize(char, add_special=False)[-1] for char in "QZ")
    pieces = {q: engine.vocab.piece(q).decode(), z: engine.vocab.piece(z).decode()}
    both = greedy({str(q): 100, str(z): 100})
    assert both and set(both) <= set(pieces[q] + pieces[z])
    preferred = q if both.startswith(pieces[q]) else z
    other = z if preferred == q else q
    assert greedy({str(preferred): -100, str(other): 100}) == pieces[other] * 6
    assert greedy({str(preferred): 100}) == pieces[preferred] * 6


@pytest.mark.llama
@pytest.mark.parametrize(
    ("bias", "words"),
    [({"x": 1}, "token ids"), ({"99999999": 1}, "lie in"), ({"5": 500}, "[-100, 100]"), ([1], "map")],
)
def test_bad_logit_bias_is_400(server: BackgroundServer, bias: Any, words: str) -> None:
    status, answer = post_json(server.url + "/v1/completions", {**COMPLETION, "logit_bias": bias})
    assert status == 400 and answer["error"]["param"] == "logit_bias"
    assert words in answer["error"]["message"]


@pytest.mark.llama
def test_deployment_options_come_back_as_notes(server: BackgroundServer) -> None:
    status, answer = post_json(
        server.url + "/api/generate", {**OLLAMA_GEN, "options": {"num_predict": 2, "num_gpu": 7}}
    )
    assert status == 200
    assert any("options.num_gpu=7" in note for note in answer["notes"])


def test_the_docs_list_every_field() -> None:
    """docs/runtime.md's tables are what users read; they must not drift from the code's."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "runtime.md"
    text = docs.read_text()
    section = text[text.index("## Request fields") : text.index("## Termination reasons")]
    for fields in (OPENAI_CHAT, OPENAI_COMPLETIONS, OLLAMA_GENERATE, OLLAMA_CHAT, OLLAMA_OPTIONS):
        for name in fields.honoured | set(fields.refused_values) | fields.deployment:
            assert f"`{name}`" in section, name

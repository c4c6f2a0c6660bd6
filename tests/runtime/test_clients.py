"""The official openai and ollama Python clients against a real runtime."""

from __future__ import annotations

import ollama
import openai
import pytest
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME

pytestmark = pytest.mark.llama


def test_openai_models(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list().data] == [SERVED_NAME]


def test_openai_chat(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens > 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


def test_openai_usage_reports_prompt_tokens_served_from_the_cache(make_server) -> None:  # type: ignore[no-untyped-def]
    """A conversation's next turn resends its history; the runtime computes only what is new and
    says so where OpenAI does (usage.prompt_tokens_details.cached_tokens). A server of its own: the
    cache keeps room in proportion to what it served lately, so the shared server's earlier traffic
    of unrelated prompts would decide the answer."""
    server: BackgroundServer = make_server("--parallel", "2", "--num-ctx", "256")
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    history = [
        {"role": "system", "content": "You answer questions about caches. " * 2},
        {"role": "user", "content": "What does a prompt cache keep?"},
    ]
    kwargs = {"model": SERVED_NAME, "max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}
    first = oai.chat.completions.create(messages=history, **kwargs)  # type: ignore[call-overload]
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And for how long?"},
    ]
    second = oai.chat.completions.create(messages=history, **kwargs)  # type: ignore[call-overload]
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and first.usage.prompt_tokens - 8 <= cached < second.usage.prompt_tokens


def test_openai_chat_stream_matches_non_stream(oai: openai.OpenAI) -> None:
    kwargs = dict(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "stream me"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = oai.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    chunks = list(
        oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_openai_completions(oai: openai.OpenAI) -> None:
    reply = oai.completions.create(
        model=SERVED_NAME, prompt="abc", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    streamed = oai.completions.create(
        model=SERVED_NAME,
        prompt="abc",
        max_tokens=5,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_openai_unknown_model(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert "gpt-4o" in str(caught.value)


def test_ollama_generate(oll: ollama.Client) -> None:
    reply = oll.generate(
        model=SERVED_NAME, prompt="hi", options={"num_predict": 5, "temperature": 0, "ignore_eos": True}
    )
    assert reply.done and reply.done_reason == "length"
    assert reply.eval_count == 5
    assert (reply.prompt_eval_count or 0) > 0
    parts = list(
        oll.generate(
            model=SERVED_NAME,
            prompt="hi",
            stream=True,
            options={"num_predict": 5, "temperature": 0, "ignore_eos": True},
        )
    )
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == reply.response


def test_ollama_chat(oll: ollama.Client) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    options = {"num_predict": 4, "temperature": 0, "ignore_eos": True}
    reply = oll.chat(model=f"{SERVED_NAME}:latest", messages=messages, options=options)
    assert reply.message.role == "assistant"
    assert reply.eval_count == 4
    parts = list(oll.chat(model=SERVED_NAME, messages=messages, options=options, stream=True))
    assert "".join(p.message.content or "" for p in parts) == reply.message.content
    assert parts[-1].done_reason == "length"


def test_ollama_listing(oll: ollama.Client) -> None:
    assert [m.model for m in oll.list().models] == [f"{SERVED_NAME}:latest"]
    running = oll.ps().models
    assert len(running) == 1 and running[0].context_length == 256
    assert oll.show(SERVED_NAME).details is not None


def test_ollama_unknown_model(oll: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        oll.generate(model="llama3", prompt="hi")
    assert caught.value.status_code == 404
    assert "llama3" in caught.value.error


def test_version_and_probes(server: BackgroundServer) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/api/version") as response:
        assert json.load(response)["version"]
    with urllib.request.urlopen(server.url + "/healthz") as response:
        assert response.status == 200
    with urllib.request.urlopen(server.url + "/readyz") as response:
        assert json.load(response)["status"] == "ready"

"""Logprobs: the model's log-probabilities of the generated tokens and the top alternatives, in
OpenAI chat, OpenAI completions and Ollama, streaming and not, through the official clients.

The model has random weights, so nothing here rests on which tokens come out; only on what holds for
any model: log-probabilities are <= 0, the alternatives are the requested count, most likely first,
and their probabilities sum to at most 1; at temperature 0 without penalties the chosen token is the
most likely one; the tokens' bytes are the answer's bytes; an entry never arrives before its text.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionTokenLogprob
from parallama_runtime.engine import TokenLogprob
from parallama_runtime.engine.logprobs import LogprobQueue, token_logprob
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME, post_json

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
"""OpenAI's defaults have no penalties, so greedy decoding picks the model's most likely token."""
OLLAMA_GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "ignore_eos": True}
"""Ollama's default repeat_penalty (1.1) would move the choice away from the model's top-1."""
MESSAGES = [{"role": "user", "content": "tell me about logprobs"}]


def _check_position(logprob: float, top: list[tuple[str, float]], count: int, *, greedy: bool) -> None:
    """One position: ``count`` alternatives, most likely first, a distribution's share, and (greedy)
    the chosen token's logprob equal to the top-1's."""
    assert logprob <= 0
    assert len(top) == count
    values = [value for _, value in top]
    assert values == sorted(values, reverse=True)
    assert all(value <= 0 for value in values)
    assert sum(math.exp(value) for value in values) <= 1 + 1e-6
    if greedy and top:
        assert logprob == values[0]


# ------------------------------------------------------------------ the engine's pieces, no server


def _logits(values: list[float]) -> Any:
    row = (ctypes.c_float * len(values))(*values)
    return ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), row


def test_token_logprob_is_the_log_softmax_of_the_raw_logits() -> None:
    values = [2.0, 0.5, 2.0, -1.0, 3.0]
    pointer, _keep = _logits(values)
    pieces = {0: b"a", 1: b"b", 2: b"c", 3: b"\xc3", 4: b"e"}
    entry = token_logprob(pointer, len(values), 1, 3, pieces.__getitem__, b"")
    expected = np.log(np.exp(np.array(values, dtype=np.float64)) / np.exp(values).sum())
    assert entry.token == "b" and entry.bytes == (98,)
    assert entry.logprob == pytest.approx(expected[1], abs=1e-6)
    # most likely first; a tie (tokens 0 and 2) in token order
    assert [top.token for top in entry.top] == ["e", "a", "c"]
    assert [top.logprob for top in entry.top] == pytest.approx(
        [expected[4], expected[0], expected[2]], abs=1e-6
    )


def test_token_text_continues_an_incomplete_character() -> None:
    """The answer's decoder holds the first byte of "é": the token completing it carries the whole
    character, and an alternative is decoded as if it came next."""
    pointer, _keep = _logits([0.0, 1.0])
    pieces = {0: b"\xa9", 1: b"x"}
    entry = token_logprob(pointer, 2, 0, 2, pieces.__getitem__, b"\xc3")
    assert entry.token == "é" and entry.bytes == (0xA9,)
    assert [top.token for top in entry.top] == ["\ufffdx", "é"]


def _entry(name: str) -> TokenLogprob:
    return TokenLogprob(name, -1.0, tuple(name.encode()))


def test_queue_releases_an_entry_with_its_text() -> None:
    queue = LogprobQueue()
    queue.add(_entry("ab"), "ab")
    assert queue.sent("a") == ()  # "b" is held back (it could start a stop sequence)
    queue.add(_entry("c"), "c")
    assert [e.token for e in queue.sent("bc")] == ["ab", "c"]
    queue.add(_entry("d"), "d")
    assert [e.token for e in queue.rest()] == ["d"]


def test_queue_drops_the_tokens_of_a_stop_sequence() -> None:
    """Answer "xy", stop "STOP": "yS" straddles the cut and is reported, "TO" and "P" are not."""
    queue = LogprobQueue()
    for text in ("x", "yS", "TO", "P"):
        queue.add(_entry(text), text)
        if text == "x":
            assert [e.token for e in queue.sent("x")] == ["x"]
    assert [e.token for e in queue.stopped("y")] == ["yS"]
    assert queue.rest() == ()


# ------------------------------------------------------------------ OpenAI chat


def test_openai_chat_logprobs(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=5, **GREEDY
    )  # type: ignore[call-overload]
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens == 8
    for entry in content:
        _check_position(entry.logprob, [(t.token, t.logprob) for t in entry.top_logprobs], 5, greedy=True)
        assert entry.bytes == entry.top_logprobs[0].bytes  # greedy: the top-1 is the chosen token
    answer = bytes(b for entry in content for b in entry.bytes or [])
    assert answer.decode("utf-8", "replace") == choice.message.content
    assert choice.message.content.startswith("".join(entry.token for entry in content))


def test_openai_chat_logprobs_stream(oai: openai.OpenAI) -> None:
    """Per chunk: the entries of the tokens whose text the chunk carries."""
    whole = oai.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2, **GREEDY
    )  # type: ignore[call-overload]
    chunks = list(
        oai.chat.completions.create(
            model=SERVED_NAME,
            messages=MESSAGES,
            max_tokens=8,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            **GREEDY,
        )  # type: ignore[call-overload]
    )
    entries: list[ChatCompletionTokenLogprob] = []
    for chunk in chunks:
        if not chunk.choices or chunk.choices[0].logprobs is None:
            continue
        content = chunk.choices[0].logprobs.content or []
        assert "".join(e.token for e in content) == chunk.choices[0].delta.content
        entries.extend(content)
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    assert [e.bytes for e in entries] == [e.bytes for e in whole.choices[0].logprobs.content]
    for entry in entries:
        _check_position(entry.logprob, [(t.token, t.logprob) for t in entry.top_logprobs], 2, greedy=True)


def test_openai_chat_logprobs_without_alternatives(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=3, logprobs=True, **GREEDY
    )  # type: ignore[call-overload]
    assert reply.choices[0].logprobs is not None
    content = reply.choices[0].logprobs.content
    assert content is not None and len(content) == 3
    assert all(entry.top_logprobs == [] and entry.logprob <= 0 for entry in content)


def test_no_logprobs_unless_asked(oai: openai.OpenAI, oll: ollama.Client) -> None:
    chat = oai.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=2, **GREEDY)  # type: ignore[call-overload]
    assert chat.choices[0].logprobs is None
    text = oai.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=2, **GREEDY)  # type: ignore[call-overload]
    assert text.choices[0].logprobs is None
    streamed = oai.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=2, stream=True, **GREEDY
    )  # type: ignore[call-overload]
    assert all(c.choices[0].logprobs is None for c in streamed if c.choices)
    reply = oll.generate(model=SERVED_NAME, prompt="hi", options={"num_predict": 2, **OLLAMA_GREEDY})
    assert reply.logprobs is None


def test_stop_sequence_tokens_are_not_reported(oai: openai.OpenAI) -> None:
    """A stop taken from the greedy answer itself ends the answer before it: the entries cover the
    answer (the last one may straddle the cut) and, streamed, never run ahead of the text."""
    free = oai.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=16, **GREEDY)  # type: ignore[call-overload]
    text = free.choices[0].message.content or ""
    cut = next(
        (
            k
            for k in range(2, len(text) - 2)
            if "\ufffd" not in text[k : k + 2] and text.find(text[k : k + 2]) == k
        ),
        None,
    )
    if cut is None:
        pytest.skip(f"the greedy answer {text!r} has no usable stop sequence")
    stop = text[cut : cut + 2]
    kwargs = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 16, "stop": [stop], "logprobs": True}
    reply = oai.chat.completions.create(**kwargs, **GREEDY)  # type: ignore[call-overload]
    answer = reply.choices[0].message.content or ""
    assert answer == text[:cut] and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].logprobs is not None
    content = reply.choices[0].logprobs.content
    assert content is not None
    starts = np.cumsum([0] + [len(e.token) for e in content])
    assert all(start < len(answer) for start in starts[:-1])  # every reported token has answer text
    assert starts[-1] >= len(answer)  # and the answer's tokens are all there

    progress = []
    sent = reported = 0
    for chunk in oai.chat.completions.create(stream=True, **kwargs, **GREEDY):  # type: ignore[call-overload]
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        sent += len(choice.delta.content or "")
        reported += sum(len(e.token) for e in (choice.logprobs.content or [])) if choice.logprobs else 0
        progress.append((sent, reported))
    assert (sent, reported) == (len(answer), starts[-1])
    # an entry never runs ahead of its text; only the cut's token (then the closing chunk) may
    assert all(reported <= sent for sent, reported in progress[:-2])


# ------------------------------------------------------------------ OpenAI completions


def test_openai_completion_logprobs(oai: openai.OpenAI) -> None:
    reply = oai.completions.create(model=SERVED_NAME, prompt="once upon", max_tokens=6, logprobs=3, **GREEDY)  # type: ignore[call-overload]
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None and logprobs.text_offset is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 6
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert value <= 0 and token in top and top[token] == value
        assert 1 <= len(top) <= 4  # the 3 most likely and the chosen one (often among them)
        assert value == max(top.values())  # greedy
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(6)]
    assert reply.choices[0].text.startswith("".join(logprobs.tokens))

    offsets: list[int] = []
    tokens: list[str] = []
    for chunk in oai.completions.create(
        model=SERVED_NAME, prompt="once upon", max_tokens=6, logprobs=3, stream=True, **GREEDY
    ):  # type: ignore[call-overload]
        part = chunk.choices[0].logprobs
        if part is not None:
            offsets += part.text_offset or []
            tokens += part.tokens or []
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


# ------------------------------------------------------------------ Ollama


def test_ollama_generate_logprobs(oll: ollama.Client) -> None:
    options = {"num_predict": 6, **OLLAMA_GREEDY}
    reply = oll.generate(
        model=SERVED_NAME, prompt="once upon", options=options, logprobs=True, top_logprobs=4
    )
    assert reply.logprobs is not None and len(reply.logprobs) == reply.eval_count == 6
    for entry in reply.logprobs:
        top = [(t.token, t.logprob) for t in entry.top_logprobs or []]
        _check_position(entry.logprob, top, 4, greedy=True)
    parts = list(
        oll.generate(
            model=SERVED_NAME, prompt="once upon", options=options, logprobs=True, top_logprobs=4, stream=True
        )
    )
    streamed = [entry for part in parts for entry in part.logprobs or []]
    assert [e.token for e in streamed] == [e.token for e in reply.logprobs]
    assert all(
        part.logprobs is None or "".join(e.token for e in part.logprobs) == part.response for part in parts
    )


def test_ollama_chat_logprobs(oll: ollama.Client) -> None:
    options = {"num_predict": 5, **OLLAMA_GREEDY}
    reply = oll.chat(model=SERVED_NAME, messages=MESSAGES, options=options, logprobs=True)
    assert reply.logprobs is not None and len(reply.logprobs) == reply.eval_count == 5
    assert all(entry.logprob <= 0 and entry.top_logprobs is None for entry in reply.logprobs)
    parts = list(
        oll.chat(
            model=SERVED_NAME, messages=MESSAGES, options=options, logprobs=True, top_logprobs=2, stream=True
        )
    )
    streamed = [entry for part in parts for entry in part.logprobs or []]
    assert len(streamed) == 5
    for entry in streamed:
        _check_position(
            entry.logprob, [(t.token, t.logprob) for t in entry.top_logprobs or []], 2, greedy=True
        )


def test_ollama_top_logprobs_only_with_logprobs(oll: ollama.Client) -> None:
    """As in Ollama: top_logprobs alone asks for nothing (its range is still checked)."""
    reply = oll.generate(
        model=SERVED_NAME, prompt="hi", options={"num_predict": 2, **OLLAMA_GREEDY}, top_logprobs=3
    )
    assert reply.logprobs is None


# ------------------------------------------------------------------ bad requests


@pytest.mark.parametrize(
    ("path", "extra", "named"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
    ],
)
def test_openai_bad_logprobs_are_400(
    server: BackgroundServer, path: str, extra: dict[str, Any], named: str
) -> None:
    base: dict[str, Any] = {"model": SERVED_NAME, "max_tokens": 2}
    base.update({"messages": MESSAGES} if "chat" in path else {"prompt": "hi"})
    status, body = post_json(server.url + path, {**base, **extra})
    assert status == 400
    assert body["error"]["param"] == named and named in body["error"]["message"]


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
def test_ollama_bad_logprobs_are_400(
    server: BackgroundServer, path: str, extra: dict[str, Any], named: str
) -> None:
    base: dict[str, Any] = {"model": SERVED_NAME, "stream": False, "options": {"num_predict": 2}}
    base.update({"messages": MESSAGES} if path == "/api/chat" else {"prompt": "hi"})
    status, body = post_json(server.url + path, {**base, **extra})
    assert status == 400 and named in body["error"]

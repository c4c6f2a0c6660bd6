"""Text handling: stop sequences end to end, UTF-8 split over byte tokens, held-back partial stops."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest
from parallama_runtime.engine import SamplingParams, TextChunk
from parallama_runtime.engine.requests import Request
from parallama_runtime.engine.sampling import StopMatcher, held_back
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME


def _complete(server: BackgroundServer, **body: Any) -> dict[str, Any]:
    payload = {"model": SERVED_NAME, "temperature": 0, "ignore_eos": True, **body}
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(payload).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return dict(json.load(response))


@pytest.mark.llama
def test_stop_sequence_cuts_the_text(server: BackgroundServer) -> None:
    full = _complete(server, prompt="stop test", max_tokens=24)["choices"][0]["text"]
    candidates = [full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    if not candidates:
        pytest.skip("the random model produced no usable stop string")
    stop = candidates[0]
    cut = _complete(server, prompt="stop test", max_tokens=24, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]


@pytest.mark.llama
def test_utf8_split_over_byte_tokens_comes_out_whole(server: BackgroundServer) -> None:
    engine = server.server.engine
    assert engine is not None
    tokens = engine.tokenize("é€", add_special=False, parse_special=False)
    assert len(tokens) >= 5  # byte fallback: 2 + 3 byte tokens (after SentencePiece's space marker)
    loop = asyncio.new_event_loop()
    try:
        request = Request(1, [1], SamplingParams(max_tokens=100), loop)
        request.submitted_at = request.last_at = time.perf_counter()
        outbox: list[tuple[Any, Any]] = []
        for token in tokens:
            engine._on_token(request, token, time.perf_counter(), outbox)
    finally:
        loop.close()
    texts = [event.text for _, event in outbox if isinstance(event, TextChunk)]
    assert len(texts) == len(tokens)  # one chunk per token
    assert texts[-5:] == ["", "é", "", "", "€"]  # characters only once all their bytes arrived
    assert "".join(texts).strip() == "é€"


def test_held_back_tail() -> None:
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc", "bq"]) == 2
    assert held_back("", ["a"]) == 0


def test_the_earliest_stop_wins_whatever_the_order_given() -> None:
    for stops in (["lazy", "fox"], ["fox", "lazy"]):
        matcher = StopMatcher(stops)
        assert matcher.feed("the quick brown fox jumps over the lazy dog") == ("the quick brown ", True)
    # a stop that starts in held-back text and one that completes inside the new piece
    matcher = StopMatcher(["xyz", "yq"])
    assert matcher.feed("abcx") == ("abc", False)
    assert matcher.feed("yqz") == ("x", True)  # "yq" starts at 1, "xyz" never completes


def test_text_held_back_for_a_stop_is_flushed_when_generation_ends_otherwise() -> None:
    matcher = StopMatcher(["world"])
    assert matcher.feed("hello wor") == ("hello ", False)
    assert matcher.flush() == "wor"
    assert matcher.flush() == ""


@pytest.mark.llama
def test_end_of_generation_flushes_held_back_text(server: BackgroundServer) -> None:
    """A stream that ends on EOS while text is held back for a possible stop keeps that text."""
    engine = server.server.engine
    assert engine is not None
    loop = asyncio.new_event_loop()
    try:
        request = Request(1, [1], SamplingParams(max_tokens=100, stop=["wor" + "ld!"]), loop)
        request.submitted_at = request.last_at = time.perf_counter()
        outbox: list[tuple[Any, Any]] = []
        for token in engine.tokenize(" hello wor", add_special=False, parse_special=False):
            engine._on_token(request, token, time.perf_counter(), outbox)
        held = "".join(event.text for _, event in outbox if isinstance(event, TextChunk))
        engine._on_token(request, engine.eos_token_id, time.perf_counter(), outbox)
    finally:
        loop.close()
    texts = "".join(event.text for _, event in outbox if isinstance(event, TextChunk))
    assert "wor" not in held and texts.strip() == "hello wor"
    assert outbox[-1][1].reason == "stop"

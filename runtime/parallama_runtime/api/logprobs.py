"""Logprobs in each API's words: the request fields that ask for them, and the response objects.

The engine gives each token's entry (:class:`~parallama_runtime.engine.TokenLogprob`: the model's
log-probability before any sampling setting, see :mod:`parallama_runtime.engine.logprobs`) on the
chunk that carries its text; here they become:

* OpenAI chat (``logprobs: true``, ``top_logprobs: 0..20``): ``choice.logprobs = {"content":
  [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}``, and per
  chunk when streaming. ``top_logprobs`` without ``logprobs: true`` is a 400, as at OpenAI.
* OpenAI completions (``logprobs: 0..5``): ``{"tokens", "token_logprobs", "top_logprobs":
  [{token: logprob}], "text_offset"}``; each ``top_logprobs`` map holds the most likely tokens and
  the chosen one (so up to ``logprobs + 1`` keys, as OpenAI documents). ``text_offset`` counts
  characters of the choice's ``text`` (the prompt is never echoed), continuing across streamed chunks.
* Ollama (``logprobs: true``, ``top_logprobs: 0..20``): ``"logprobs": [{token, logprob, bytes,
  top_logprobs}]`` on each streamed object and, whole, on the non-streamed answer. As in Ollama,
  ``top_logprobs`` only applies with ``logprobs: true``, ``top_logprobs`` is left out when it is 0,
  and ``bytes`` when empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..engine import TokenLogprob, TopLogprob
from .common import ApiError

__all__ = [
    "MAX_COMPLETION_LOGPROBS",
    "MAX_TOP_LOGPROBS",
    "CompletionOffsets",
    "ollama_logprobs",
    "ollama_request",
    "openai_chat_logprobs",
    "openai_chat_request",
    "openai_completion_logprobs",
    "openai_completion_request",
]

MAX_TOP_LOGPROBS = 20
"""OpenAI's and Ollama's bound on ``top_logprobs``."""
MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's bound on the completions route's ``logprobs``."""


def _count(value: Any, name: str, bound: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ApiError(400, f"{name} must be an integer between 0 and {bound}", param=name)
    if not 0 <= value <= bound:
        raise ApiError(400, f"{name} must be between 0 and {bound}, got {value}", param=name)
    return int(value)


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean", param=name)
    return value


# ---------------------------------------------------------------------------------------- requests


def openai_chat_request(body: Mapping[str, Any]) -> int | None:
    """The top alternatives a chat request asks for (None: no logprobs)."""
    wanted = _flag(body.get("logprobs"), "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    if not wanted:
        return None
    return 0 if top is None else _count(top, "top_logprobs", MAX_TOP_LOGPROBS)


def openai_completion_request(body: Mapping[str, Any]) -> int | None:
    """The completions route's ``logprobs``: the number of top alternatives (None: none)."""
    value = body.get("logprobs")
    return None if value is None else _count(value, "logprobs", MAX_COMPLETION_LOGPROBS)


def ollama_request(body: Mapping[str, Any]) -> int | None:
    """Ollama checks ``top_logprobs``'s range whether or not ``logprobs`` is set, and uses it only
    with ``logprobs: true``."""
    wanted = _flag(body.get("logprobs"), "logprobs")
    top = body.get("top_logprobs")
    count = 0 if top is None else _count(top, "top_logprobs", MAX_TOP_LOGPROBS)
    return count if wanted else None


# --------------------------------------------------------------------------------------- responses


def _alternative(entry: TopLogprob | TokenLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}


def openai_chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {**_alternative(entry), "top_logprobs": [_alternative(top) for top in entry.top]}
            for entry in entries
        ],
        "refusal": None,
    }


class CompletionOffsets:
    """``text_offset`` of the completions route: where each token's text starts in the choice's
    text, counted across the chunks of a stream (the tokens' texts join to the answer)."""

    def __init__(self) -> None:
        self.at = 0

    def logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for entry in entries:
            offsets.append(self.at)
            self.at += len(entry.token)
        return {
            "tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [
                {**{top.token: top.logprob for top in entry.top}, entry.token: entry.logprob}
                for entry in entries
            ],
            "text_offset": offsets,
        }


def openai_completion_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The whole answer's ``logprobs`` object (not streamed)."""
    return CompletionOffsets().logprobs(entries)


def _ollama_entry(entry: TopLogprob | TokenLogprob) -> dict[str, Any]:
    out: dict[str, Any] = {"token": entry.token, "logprob": entry.logprob}
    if entry.bytes:
        out["bytes"] = list(entry.bytes)
    return out


def ollama_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        item = _ollama_entry(entry)
        if entry.top:
            item["top_logprobs"] = [_ollama_entry(top) for top in entry.top]
        out.append(item)
    return out

"""The OpenAI routes: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, with
``stream=true`` as server-sent events."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engine import Finish, SamplingParams, TextChunk, TokenLogprob
from .common import ApiError, __version__, number, stops
from .fields import OPENAI_CHAT, OPENAI_COMPLETIONS
from .logprobs import (
    CompletionOffsets,
    openai_chat_logprobs,
    openai_chat_request,
    openai_completion_logprobs,
    openai_completion_request,
)
from .structured import openai_response_format_grammar
from .tools import (
    ToolCall,
    ToolRequest,
    ToolStream,
    finish_reason,
    openai_tool_call_deltas,
    openai_tool_calls,
    openai_tools,
)

if TYPE_CHECKING:
    from .app import RuntimeAPI

__all__ = ["OpenAIRoutes"]

_PLACEHOLDER = "\x00parallama-text\x00"
"""Stands for the token text in pre-serialised SSE chunks; no token decodes to NUL bytes around text."""
_PLACEHOLDER_JSON = json.dumps(_PLACEHOLDER).encode()


class OpenAIRoutes:
    """Handlers in OpenAI's dialect, on the shared plumbing of :class:`.app.RuntimeAPI`."""

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{name:.+}", self.model),
        ]

    def _params(self, body: Mapping[str, Any]) -> SamplingParams:
        params = SamplingParams(
            max_tokens=self.api.card.num_ctx or 4096,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            repeat_penalty=1.0,
        )
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            value = int(number(limit, "max_tokens", integer=True))
            if value < 1:
                raise ApiError(400, "max_tokens must be at least 1")
            params.max_tokens = value
        for key, attr in (
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("min_p", "min_p"),
            ("repeat_penalty", "repeat_penalty"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
        ):
            if body.get(key) is not None:
                setattr(params, attr, number(body[key], key))
        if body.get("top_k") is not None:
            params.top_k = int(number(body["top_k"], "top_k", integer=True))
        if body.get("seed") is not None:
            params.seed = int(number(body["seed"], "seed", integer=True))
        params.stop = stops(body.get("stop"), "stop")
        params.ignore_eos = bool(body.get("ignore_eos"))  # llama.cpp server's extension
        params.logit_bias = self._logit_bias(body.get("logit_bias"))
        params.grammar = openai_response_format_grammar(body.get("response_format"))
        return params

    def _logit_bias(self, value: Any) -> dict[int, float]:
        """OpenAI's map of token ids (as strings) to a bias in [-100, 100]; -100 bans the token
        (llama.cpp takes -inf for that, as llama-server does with ``false``)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ApiError(
                400, "logit_bias must be an object mapping token ids to numbers", param="logit_bias"
            )
        n_vocab = self.api.engine.n_vocab
        biases: dict[int, float] = {}
        for key, bias in value.items():
            name = f"logit_bias.{key}"
            try:
                token = int(key)
            except ValueError:
                raise ApiError(400, f"{name}: keys must be token ids", param="logit_bias") from None
            if not 0 <= token < n_vocab:
                raise ApiError(400, f"{name}: token ids lie in [0, {n_vocab})", param="logit_bias")
            amount = number(bias, name)
            if not -100 <= amount <= 100:
                raise ApiError(400, f"{name} must lie in [-100, 100], got {amount}", param="logit_bias")
            biases[token] = -math.inf if amount <= -100 else amount
        return biases

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, size = await self.api.sized_body(request)
        self.api.check_model(body, "openai")
        OPENAI_CHAT.check(body)
        self.api.check_ready()
        if "messages" not in body:
            raise ApiError(400, "messages is required")
        tools = openai_tools(body, self.api.engine.chat_template)
        prompt = await self.api.prompt(
            size, "openai", messages=body["messages"], tools=tools.offered if tools else None
        )
        return await self._run(request, body, prompt, chat=True, tools=tools)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, size = await self.api.sized_body(request)
        self.api.check_model(body, "openai")
        OPENAI_COMPLETIONS.check(body)
        self.api.check_ready()
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if isinstance(raw, str):
            prompt = await self.api.prompt(size, "openai", text=raw)
        elif (
            isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)
        ):
            if any(t < 0 or t >= self.api.engine.n_vocab for t in raw):
                raise ApiError(400, f"prompt token ids must lie in [0, {self.api.engine.n_vocab})")
            prompt = list(raw)
        else:
            raise ApiError(
                400, "prompt must be a string, a one-element list of strings or a list of token ids"
            )
        return await self._run(request, body, prompt, chat=False)

    async def _run(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        prompt: list[int],
        *,
        chat: bool,
        tools: ToolRequest | None = None,
    ) -> web.StreamResponse:
        params = self._params(body)
        params.logprobs = openai_chat_request(body) if chat else openai_completion_request(body)
        if tools is not None:  # a forced call's grammar, or calls next to response_format's
            params.grammar = tools.grammar(params.grammar)
        parsing = tools if tools is not None and tools.parses else None
        handle = self.api.submit(prompt, params, truncate=False)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = self.api.card.name
        obj = "chat.completion" if chat else "text_completion"

        def usage(finish: Finish) -> dict[str, Any]:
            return {
                "prompt_tokens": finish.prompt_tokens,
                "completion_tokens": finish.completion_tokens,
                "total_tokens": finish.prompt_tokens + finish.completion_tokens,
                # OpenAI's field for prompt tokens served from its prompt cache
                "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
            }

        if not body.get("stream"):
            entries: list[TokenLogprob] | None = [] if params.logprobs is not None else None
            text, finish = await self.api.collect(handle, entries)
            self.api.raise_for_finish(finish)
            logprobs = None
            if entries is not None:
                logprobs = openai_chat_logprobs(entries) if chat else openai_completion_logprobs(entries)
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                reason = finish.reason
                if parsing is not None:
                    content, calls = parsing.parser().parse(text)
                    if calls:
                        message = {
                            "role": "assistant",
                            "content": content,
                            "tool_calls": openai_tool_calls(calls),
                        }
                        reason = finish_reason(reason, calls)
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.reason}
            self.api.metrics.count_request("openai", 200)
            self.api.metrics.observe_duration(finish.total_seconds)
            return web.json_response(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "system_fingerprint": f"parallama-{__version__}",
                    "choices": [choice],
                    "usage": usage(finish),
                }
            )

        stream_options = body.get("stream_options") or {}
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(payload: Mapping[str, Any]) -> bytes:
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        def chunk(delta_text: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                c: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            else:
                c = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish_reason}
            return {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [c]}

        first = [True]
        # The hot path, once per token and stream: only the text changes between chunks, so the
        # chunk is serialised once around a placeholder and each token splices its JSON string in.
        head, tail = sse(chunk(_PLACEHOLDER, None)).split(_PLACEHOLDER_JSON)

        def on_text(text: str) -> bytes:
            if chat and first[0]:
                first[0] = False
                return sse(chunk(text, None, role=True))
            first[0] = False
            return head + json.dumps(text).encode() + tail

        offsets = CompletionOffsets()

        def on_chunk(event: TextChunk) -> bytes:
            """A chunk with its tokens' logprobs (requests that ask for them leave the hot path)."""
            payload = chunk(event.text, None, role=chat and first[0])
            first[0] = False
            if event.logprobs:
                payload["choices"][0]["logprobs"] = (
                    openai_chat_logprobs(event.logprobs) if chat else offsets.logprobs(event.logprobs)
                )
            return sse(payload)

        on_logprobs = on_chunk if params.logprobs is not None else None
        tool_stream = ToolStream(parsing.parser()) if parsing is not None else None

        def tool_events(content: TextChunk | None, calls: list[ToolCall], index: int) -> bytes:
            """Content held back while it might have been a call, then the calls as OpenAI streams
            them (see :mod:`.tools`)."""
            out = on_chunk(content) if content is not None else b""
            for delta in openai_tool_call_deltas(calls, index):
                payload = chunk(None, None, role=first[0])
                if first[0]:
                    payload["choices"][0]["delta"]["content"] = None  # as OpenAI's first call chunk
                first[0] = False
                payload["choices"][0]["delta"]["tool_calls"] = [delta]
                out += sse(payload)
            return out

        def on_tool_chunk(event: TextChunk) -> bytes:
            assert tool_stream is not None
            return tool_events(*tool_stream.feed(event))

        def on_finish(finish: Finish) -> bytes:
            out = b""
            reason = finish.reason
            if tool_stream is not None:
                out += tool_events(*tool_stream.finish())
                reason = finish_reason(reason, tool_stream.sent)
            if chat and first[0]:
                out += sse(chunk("", None, role=True))
            out += sse(chunk(None if chat else "", reason))
            if include_usage:
                out += sse(
                    {
                        "id": rid,
                        "object": chunk_obj,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(finish),
                    }
                )
            return out + b"data: [DONE]\n\n"

        def on_error(message: str) -> bytes:
            return (
                sse({"error": {"message": message, "type": "server_error", "code": 500}})
                + b"data: [DONE]\n\n"
            )

        return await self.api.stream(
            request,
            handle,
            "openai",
            content_type="text/event-stream",
            on_text=on_text,
            on_finish=on_finish,
            on_error=on_error,
            on_chunk=on_tool_chunk if tool_stream is not None else on_logprobs,
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self.api.card.accepts(name):
            raise ApiError(404, f"The model `{name}` does not exist", kind="not_found_error")
        return web.json_response(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.api.card.name,
            "object": "model",
            "created": int(self.api.card.modified_at),
            "owned_by": "parallama",
        }

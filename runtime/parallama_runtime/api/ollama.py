"""The Ollama routes: ``/api/generate``, ``/api/chat`` (NDJSON streaming by default), ``/api/tags``,
``/api/ps``, ``/api/show`` and ``/api/version``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engine import Finish, SamplingParams, TextChunk, TokenLogprob
from .common import ARRIVED, OLLAMA_VERSION, ApiError, __version__, now_rfc3339, number, stops
from .fields import OLLAMA_CHAT, OLLAMA_GENERATE, OLLAMA_OPTIONS
from .logprobs import ollama_logprobs, ollama_request
from .structured import ollama_format_grammar
from .tools import ToolCall, ToolRequest, ToolStream, ollama_tool_calls, ollama_tools

if TYPE_CHECKING:
    from .app import RuntimeAPI

__all__ = ["OllamaRoutes"]

log = logging.getLogger(__name__)


class OllamaRoutes:
    """Handlers in Ollama's dialect, on the shared plumbing of :class:`.app.RuntimeAPI`."""

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/generate", self.generate),
            web.post("/api/chat", self.chat),
            web.get("/api/tags", self.tags),
            web.get("/api/ps", self.ps),
            web.get("/api/version", self.version),
            web.post("/api/show", self.show),
        ]

    def _truncate(self, body: Mapping[str, Any]) -> bool:
        options = body.get("options")
        return bool(body.get("truncate") or (isinstance(options, dict) and options.get("truncate")))

    def _params(self, body: Mapping[str, Any]) -> tuple[SamplingParams, list[str]]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "options must be an object", param="options")
        notes = [
            note
            for name in OLLAMA_OPTIONS.check(options)
            for note in self._deployment_note(name, options[name])
        ]
        params = SamplingParams(max_tokens=self.api.card.num_ctx or 4096)
        predict = options.get("num_predict")
        if predict is not None:
            value = int(number(predict, "options.num_predict", integer=True))
            if value == 0:
                raise ApiError(
                    400, "options.num_predict must be positive, -1 (no limit) or -2 (fill the context)"
                )
            if value > 0:
                params.max_tokens = value
        for key in (
            "temperature",
            "top_p",
            "min_p",
            "typical_p",
            "repeat_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            if options.get(key) is not None:
                setattr(params, key, number(options[key], f"options.{key}"))
        for key in ("top_k", "repeat_last_n"):
            if options.get(key) is not None:
                setattr(params, key, int(number(options[key], f"options.{key}", integer=True)))
        if params.repeat_last_n < 0:
            params.repeat_last_n = self.api.card.num_ctx
        if options.get("seed") is not None:
            params.seed = int(number(options["seed"], "options.seed", integer=True))
        params.stop = stops(options.get("stop"), "options.stop")
        params.ignore_eos = bool(options.get("ignore_eos") or body.get("ignore_eos"))
        params.grammar = ollama_format_grammar(body.get("format"))
        for note in notes:
            log.info("%s", note)
        return params, notes

    def _deployment_note(self, name: str, value: Any) -> list[str]:
        """Why a load-time option the request sets is not applied (see :mod:`.fields`)."""
        card = self.api.card
        if name == "num_ctx":
            if value == card.num_ctx:
                return []
            return [
                f"options.num_ctx={value} ignored: slots are allocated at start "
                f"with num_ctx={card.num_ctx} (set OLLAMA_CONTEXT_LENGTH)"
            ]
        return [f"options.{name}={value} ignored: the deployment's plan sets how the model is loaded"]

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body, size = await self.api.sized_body(request)
        self.api.check_model(body, "ollama")
        OLLAMA_GENERATE.check(body)
        self.api.check_ready()
        prompt_text = body.get("prompt") or ""
        if not isinstance(prompt_text, str):
            raise ApiError(400, "prompt must be a string")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise ApiError(400, "system must be a string")
        if not prompt_text and not system:
            # Ollama answers an empty prompt by loading the model; ours is loaded already
            self.api.metrics.count_request("ollama", 200)
            return web.json_response(
                {
                    "model": self.api.card.ollama_name,
                    "created_at": now_rfc3339(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                }
            )
        truncate = self._truncate(body)
        if body.get("raw"):
            prompt = await self.api.prompt(size, "ollama", text=prompt_text, truncate=truncate)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt_text}
            ]
            prompt = await self.api.prompt(size, "ollama", messages=messages, truncate=truncate)
        return await self._run(request, body, prompt, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, size = await self.api.sized_body(request)
        self.api.check_model(body, "ollama")
        OLLAMA_CHAT.check(body)
        self.api.check_ready()
        messages = body.get("messages")
        if not messages:
            self.api.metrics.count_request("ollama", 200)
            return web.json_response(
                {
                    "model": self.api.card.ollama_name,
                    "created_at": now_rfc3339(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "load",
                }
            )
        tools = ollama_tools(body, self.api.engine.chat_template)
        prompt = await self.api.prompt(
            size,
            "ollama",
            messages=messages,
            truncate=self._truncate(body),
            tools=tools.offered if tools else None,
        )
        return await self._run(request, body, prompt, chat=True, tools=tools)

    async def _run(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        prompt: list[int],
        *,
        chat: bool,
        tools: ToolRequest | None = None,
    ) -> web.StreamResponse:
        params, notes = self._params(body)
        params.logprobs = ollama_request(body)
        if tools is not None:  # Ollama's tools are "auto": calls or what format asks for
            params.grammar = tools.grammar(params.grammar)
        handle = self.api.submit(prompt, params, truncate=self._truncate(body))
        arrived = request.get(ARRIVED)
        model = self.api.card.ollama_name
        headers = {"X-Parallama-Note": "; ".join(notes)} if notes else {}
        if handle.truncated:
            headers["X-Parallama-Truncated"] = "true"

        def piece(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done
            return out

        def final(finish: Finish, text: str) -> dict[str, Any]:
            """Ollama's closing object. ``total_duration`` runs from the request's arrival, prompt
            building included, as Ollama's does; ``load_duration`` is 0: the model is loaded before
            the runtime takes requests (503 while loading), so no request ever waits for a load;
            ``prompt_eval_count`` is every prompt token (those the prompt cache served too, as Ollama
            counts them) and ``prompt_eval_duration`` the time from admission to the first token;
            ``eval_*`` the answer's tokens and the time from its first token to its last."""
            out = piece(text, True)
            total = time.perf_counter() - arrived if isinstance(arrived, float) else finish.total_seconds
            out.update(
                {
                    "done_reason": finish.reason,
                    "total_duration": int(total * 1e9),
                    "load_duration": 0,
                    "prompt_eval_count": finish.prompt_tokens,
                    "prompt_eval_duration": int(finish.prompt_seconds * 1e9),
                    "eval_count": finish.completion_tokens,
                    "eval_duration": int(finish.generation_seconds * 1e9),
                }
            )
            if not chat and not body.get("raw"):
                out["context"] = []  # see docs/runtime.md: the context tokens are not kept
            if notes:
                out["notes"] = notes
            return out

        if body.get("stream") is False:
            entries: list[TokenLogprob] | None = [] if params.logprobs is not None else None
            text, finish = await self.api.collect(handle, entries)
            self.api.raise_for_finish(finish)
            self.api.metrics.count_request("ollama", 200)
            self.api.metrics.observe_duration(finish.total_seconds)
            answer = final(finish, text)
            if tools is not None:
                content, calls = tools.parser().parse(text)
                if calls:  # Ollama's content is a string, empty beside calls
                    answer["message"].update(content=content or "", tool_calls=ollama_tool_calls(calls))
            if entries:
                answer["logprobs"] = ollama_logprobs(entries)
            return web.json_response(answer, headers=headers)

        def line(payload: Mapping[str, Any]) -> bytes:
            return json.dumps(payload, separators=(",", ":")).encode() + b"\n"

        def with_logprobs(event: TextChunk) -> bytes:
            payload = piece(event.text, False)
            if event.logprobs:  # Ollama leaves the field out when empty
                payload["logprobs"] = ollama_logprobs(event.logprobs)
            return line(payload)

        on_logprobs = with_logprobs if params.logprobs is not None else None
        tool_stream = ToolStream(tools.parser()) if tools is not None else None

        def tool_events(content: TextChunk | None, calls: list[ToolCall], index: int) -> bytes:
            """Content held back while it might have been a call, then the calls, each complete,
            in a chunk of their own as Ollama sends them."""
            out = with_logprobs(content) if content is not None else b""
            if calls:
                payload = piece("", False)
                payload["message"]["tool_calls"] = ollama_tool_calls(calls, index)
                out += line(payload)
            return out

        def on_tool_chunk(event: TextChunk) -> bytes:
            assert tool_stream is not None
            return tool_events(*tool_stream.feed(event))

        def on_finish(finish: Finish) -> bytes:
            held = tool_events(*tool_stream.finish()) if tool_stream is not None else b""
            return held + line(final(finish, ""))

        return await self.api.stream(
            request,
            handle,
            "ollama",
            content_type="application/x-ndjson",
            headers=headers,
            on_text=lambda text: line(piece(text, False)),
            on_finish=on_finish,
            on_error=lambda message: line({"error": message}),
            on_chunk=on_tool_chunk if tool_stream is not None else on_logprobs,
        )

    def _model_entry(self) -> dict[str, Any]:
        return {
            "name": self.api.card.ollama_name,
            "model": self.api.card.ollama_name,
            "modified_at": datetime.fromtimestamp(self.api.card.modified_at, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "size": self.api.card.size_bytes,
            "digest": "",
            "details": self.api.card.details(),
        }

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self._model_entry()]})

    async def ps(self, request: web.Request) -> web.Response:
        """``size`` and ``size_vram`` are what llama.cpp reported allocating at load (every buffer:
        weights, KV cache, compute, output; the part in GPU memory), the same figures as the
        ``parallama_memory_measured_bytes`` metric; Ollama's are its own estimate of the same."""
        if not self.api.ready:
            return web.json_response({"models": []})
        entry = self._model_entry()
        del entry["modified_at"]
        forever = datetime.now(UTC) + timedelta(days=3650)
        reports = self.api.engine.reports
        entry.update(
            {
                "size": reports.total_bytes or entry["size"],
                "expires_at": forever.isoformat().replace("+00:00", "Z"),
                "size_vram": reports.device_bytes,
                "context_length": self.api.card.num_ctx,
                "num_parallel": self.api.card.num_parallel,
            }
        )
        return web.json_response({"models": [entry]})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION, "parallama": __version__})

    async def show(self, request: web.Request) -> web.Response:
        body = await self.api.body(request)
        wanted = body.get("model") or body.get("name")
        self.api.check_model({"model": wanted}, "ollama")
        return web.json_response(
            {
                "modelfile": f"FROM {self.api.card.path}\n",
                "parameters": f"num_ctx {self.api.card.num_ctx}\nnum_parallel {self.api.card.num_parallel}",
                "template": self.api.engine.chat_template or "",
                "details": self.api.card.details(),
                "model_info": {
                    "general.architecture": self.api.card.family,
                    **self.api.card.extra.get("model_info", {}),
                },
                # Ollama's words: an embedding model embeds and does nothing else; a generative one
                # takes tools whatever its template (see api/tools.py), and clients check for it
                "capabilities": ["embedding"] if self.api.engine.embedding_model else ["completion", "tools"],
                "modified_at": self._model_entry()["modified_at"],
            }
        )

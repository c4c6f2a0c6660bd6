"""HTTP surface: OpenAI and Ollama routes, health probes and /metrics, on aiohttp.

The API speaks to the engine only through its Python interface (tokenize, submit, stats) and never
imports llama.cpp. Every failure a client can cause is a 4xx with a JSON message in the dialect of
the route (OpenAI ``{"error": {...}}``, Ollama ``{"error": "..."}``); unexpected failures are a 500
with a generic message and the traceback goes to the server log, never to the client.

Work a request causes is bounded before it is done (see :class:`RequestLimits`): the body size is
checked against the Content-Length before the body is read, a prompt whose byte count alone proves it
longer than a slot is refused before it is tokenized, and large prompts are rendered and tokenized on
a small thread pool so that one huge request does not stall every stream and probe on the event loop.

A client that goes away cancels its engine request: streaming handlers notice it on the next write,
and the app runs with aiohttp's ``handler_cancellation`` so a non-streaming handler is cancelled on
disconnect; both paths end in ``handle.cancel()``, which frees the slot and its KV cells.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as _metadata
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web

from .engine import (
    Engine,
    EngineError,
    Finish,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TextChunk,
)
from .engine.chat_template import TemplateError, render_chat
from .metrics import CONTENT_TYPE, RuntimeMetrics

__all__ = ["ApiError", "ModelCard", "RequestLimits", "RuntimeAPI"]

log = logging.getLogger(__name__)

_PLACEHOLDER = "\x00parallama-text\x00"
"""Stands for the token text in pre-serialised SSE chunks; no token decodes to NUL bytes around text."""
_PLACEHOLDER_JSON = json.dumps(_PLACEHOLDER).encode()

Dialect = Literal["openai", "ollama"]

try:
    __version__ = _metadata.version("parallama")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

OLLAMA_VERSION = "0.12.0"
"""The Ollama API version this surface follows (clients check it for feature support)."""


MIB = 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on the work one request may cause, derived from the slot size ``num_ctx``.

    **Body size.** A body larger than ``max_body_bytes`` is a 413 before it is read. No prompt is
    useful beyond ``num_ctx`` tokens, and ordinary text is 3 to 5 bytes a token; JSON escaping costs
    at most 6 bytes per UTF-16 unit (``\\uXXXX``, what ``json.dumps`` writes for every non-ASCII
    character), so even CJK or emoji text stays under ~24 bytes a token. :data:`BODY_BYTES_PER_TOKEN`
    = 64 leaves room for message structure and a history a client sends for truncation; the floor of
    :data:`MIN_BODY_BYTES` (4 MiB) keeps small contexts from refusing ordinary requests. So 4096 or
    32768 tokens: 4 MiB; 131072: 8 MiB; 1M: 64 MiB (aiohttp's limit before).

    **Prompt length before tokenizing.** A token stands for at most ``max_token_bytes`` bytes of
    text, so ``ceil(bytes / max_token_bytes)`` is a lower bound on the token count that needs no
    tokenizer: when it already reaches ``num_ctx`` the prompt cannot fit and is refused without
    tokenizing it. Only this direction is safe: a token can be many characters long, so the bytes
    say nothing about an upper bound. The engine gives the bound from its vocabulary when it can
    (``Engine.max_token_bytes``, llama.cpp's longest token text); without it
    :data:`FALLBACK_MAX_TOKEN_BYTES` = 1024 is used: the vocabularies of chat models hold no token
    text of more than a few hundred bytes (llama.cpp prints the longest at load as "max token
    length"), so 1024 refuses only prompts that could not fit with any of them. At least 4 either way:
    one unknown character (up to 4 UTF-8 bytes) may become one ``<unk>`` token.

    **Off the event loop.** Rendering the chat template and tokenizing cost ~0.1 ms per KiB (measured
    on the demo model, 2 cores), a thread hop ~40 us. Bodies over :data:`OFFLOAD_BYTES` (8 KiB,
    <1 ms of work inline) are rendered and tokenized on the API's thread pool; smaller ones inline,
    where the hop would cost more than the work. JSON parsing stays inline: ``json.loads`` holds the
    GIL for the whole call, so a thread would not free the loop, and it is ~1 ms per MiB of body.
    """

    num_ctx: int
    max_token_bytes: int = 0
    """0: unknown (the fallback applies)."""

    BODY_BYTES_PER_TOKEN = 64
    MIN_BODY_BYTES = 4 * MIB
    FALLBACK_MAX_TOKEN_BYTES = 1024
    OFFLOAD_BYTES = 8 * 1024

    @property
    def max_body_bytes(self) -> int:
        return max(self.MIN_BODY_BYTES, self.num_ctx * self.BODY_BYTES_PER_TOKEN)

    @property
    def token_bytes(self) -> int:
        return max(4, self.max_token_bytes or self.FALLBACK_MAX_TOKEN_BYTES)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens ``text`` becomes (see the class docstring)."""
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        return math.ceil(size / self.token_bytes)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, kind: str = "invalid_request_error", retry_after: int = 0
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.retry_after = retry_after


@dataclass
class ModelCard:
    """What the listing routes say about the served model."""

    name: str
    path: str
    size_bytes: int = 0
    modified_at: float = 0.0
    family: str = ""
    parameter_size: str = ""
    quantization_level: str = ""
    num_ctx: int = 0
    num_parallel: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ollama_name(self) -> str:
        return self.name if ":" in self.name else f"{self.name}:latest"

    def accepts(self, wanted: str) -> bool:
        return wanted in (self.name, self.ollama_name)

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family] if self.family else None,
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error_body(dialect: Dialect, error: ApiError) -> dict[str, Any]:
    if dialect == "openai":
        return {"error": {"message": error.message, "type": error.kind, "param": None, "code": error.status}}
    return {"error": error.message}


def _number(value: Any, name: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{name} must be a {'integer' if integer else 'number'}, got {json.dumps(value)}")
    if integer and not float(value).is_integer():
        raise ApiError(400, f"{name} must be an integer, got {value}")
    return float(value)


def _stops(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    raise ApiError(400, f"{name} must be a string or a list of strings")


class RuntimeAPI:
    """The aiohttp application around one engine; ``ready`` flips once the engine is loaded."""

    PREP_THREADS = 2
    """Workers that render and tokenize large prompts: two, so that one huge prompt does not hold up
    the next, and no more, since they take CPU from llama.cpp's threads. The pool is the API's own
    (not asyncio's default executor, where model loading and /metrics run)."""

    def __init__(self, engine: Engine, metrics: RuntimeMetrics, card: ModelCard) -> None:
        self.engine = engine
        self.metrics = metrics
        self.card = card
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.started = time.time()
        self._limits = RequestLimits(card.num_ctx or 4096)
        self._pool = ThreadPoolExecutor(self.PREP_THREADS, thread_name_prefix="parallama-prep")
        self.app = web.Application(client_max_size=self._limits.max_body_bytes, middlewares=[self._errors])
        self.app.on_cleanup.append(self._shutdown_pool)
        self.app.add_routes(
            [
                web.post("/v1/chat/completions", self.openai_chat),
                web.post("/v1/completions", self.openai_completions),
                web.get("/v1/models", self.openai_models),
                web.get("/v1/models/{name:.+}", self.openai_model),
                web.post("/api/generate", self.ollama_generate),
                web.post("/api/chat", self.ollama_chat),
                web.get("/api/tags", self.ollama_tags),
                web.get("/api/ps", self.ollama_ps),
                web.get("/api/version", self.ollama_version),
                web.post("/api/show", self.ollama_show),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics_route),
                web.get("/", self.root),
            ]
        )

    # ------------------------------------------------------------------ plumbing

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        dialect: Dialect = "openai" if request.path.startswith("/v1/") else "ollama"
        try:
            return await handler(request)
        except ApiError as error:
            return self._error_response(dialect, error, request)
        except web.HTTPException as error:
            if error.status >= 400:
                api_error = ApiError(error.status, error.reason or "error", kind="not_found_error")
                if error.status == 405:
                    api_error.message = f"method {request.method} is not allowed on {request.path}"
                elif error.status == 404:
                    api_error.message = f"no route {request.path}"
                return self._error_response(dialect, api_error, request)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return self._error_response(
                dialect,
                ApiError(500, "internal server error; see the server log", kind="server_error"),
                request,
            )

    def _error_response(self, dialect: Dialect, error: ApiError, request: web.Request) -> web.Response:
        if request.path.startswith(("/v1/", "/api/generate", "/api/chat")):
            self.metrics.count_request(dialect, error.status)
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return web.json_response(_error_body(dialect, error), status=error.status, headers=headers)

    @property
    def limits(self) -> RequestLimits:
        """The request bounds, with the engine's longest token once it is loaded."""
        known = self.engine.max_token_bytes
        if isinstance(known, int) and known != self._limits.max_token_bytes:
            self._limits = replace(self._limits, max_token_bytes=known)
        return self._limits

    async def _shutdown_pool(self, app: web.Application) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _too_large(self, size: int | None) -> ApiError:
        limit = self.limits.max_body_bytes
        got = f"{size} bytes" if size is not None else "larger"
        return ApiError(
            413,
            f"request body is {got} but this server accepts at most {limit} bytes "
            f"({limit // MIB} MiB, from num_ctx={self.limits.num_ctx} tokens per slot)",
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return (await self._sized_body(request))[0]

    async def _sized_body(self, request: web.Request) -> tuple[dict[str, Any], int]:
        """The JSON object in the body and the body's size; too large a body is refused by its
        Content-Length before any of it is read (a chunked one when the reading passes the limit)."""
        length = request.content_length
        if length is not None and length > self.limits.max_body_bytes:
            raise self._too_large(length)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large(None) from None
        if not raw.strip():
            raise ApiError(400, "request body is empty; expected a JSON object")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"invalid JSON in request body: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body, len(raw)

    def _check_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "server is shutting down", kind="server_error", retry_after=5)
        if not self.ready:
            why = f"model failed to load: {self.load_error}" if self.load_error else "model is still loading"
            raise ApiError(503, why, kind="server_error", retry_after=2)

    def _check_model(self, body: Mapping[str, Any], dialect: Dialect) -> None:
        wanted = body.get("model")
        if wanted in (None, ""):
            return
        if not isinstance(wanted, str):
            raise ApiError(400, "model must be a string")
        if not self.card.accepts(wanted):
            if dialect == "ollama":
                message = f"model '{wanted}' not found (this server serves '{self.card.name}')"
            else:
                message = f"The model `{wanted}` does not exist (this server serves `{self.card.name}`)"
            raise ApiError(404, message, kind="not_found_error")

    def _tokens(self, text: str, dialect: Dialect, *, truncate: bool = False) -> list[int]:
        """Tokenize ``text``, unless its size alone proves it longer than a slot (and no truncation
        was asked for): then it is refused without the tokenizer's work."""
        if not truncate:
            limits = self.limits
            at_least = limits.min_tokens(text)
            if at_least >= limits.num_ctx:
                fix = (
                    'shorten it or send "truncate": true'
                    if dialect == "ollama"
                    else "shorten it (or use the Ollama API's truncate)"
                )
                raise ApiError(
                    400,
                    f"prompt is at least {at_least} tokens (no token of this model is longer than "
                    f"{limits.token_bytes} bytes) but the context of a slot holds {limits.num_ctx} "
                    f"(num_ctx); {fix}",
                )
        bos = self.engine.bos_text
        add_special = not (bos and text.startswith(bos))  # the template already put BOS in
        try:
            return self.engine.tokenize(text, add_special=add_special, parse_special=True)
        except UnicodeEncodeError as error:  # JSON may carry lone surrogates ("\ud800")
            raise ApiError(400, f"prompt is not valid Unicode: {error.reason} at {error.start}") from None

    async def _prompt(
        self,
        body_bytes: int,
        dialect: Dialect,
        *,
        text: str | None = None,
        messages: Any = None,
        truncate: bool = False,
    ) -> list[int]:
        """Render (when ``messages``) and tokenize, on the prep pool when the body is large."""

        def work() -> list[int]:
            prompt = self._chat_prompt(messages) if text is None else text
            return self._tokens(prompt, dialect, truncate=truncate)

        if body_bytes <= self.limits.OFFLOAD_BYTES:
            return work()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, work)

    def _ollama_truncate(self, body: Mapping[str, Any]) -> bool:
        options = body.get("options")
        return bool(body.get("truncate") or (isinstance(options, dict) and options.get("truncate")))

    def _chat_prompt(self, messages: Any) -> str:
        try:
            return render_chat(
                self.engine.chat_template,
                messages,
                bos_token=self.engine.bos_text,
                eos_token=self.engine.eos_text,
            )
        except TemplateError as error:
            raise ApiError(400, str(error)) from None

    def _submit(self, prompt: list[int], params: SamplingParams, *, truncate: bool) -> RequestHandle:
        try:
            return self.engine.submit(prompt, params, truncate=truncate)
        except QueueFullError as error:
            raise ApiError(503, str(error), kind="server_error", retry_after=1) from None
        except PromptTooLongError as error:
            raise ApiError(400, str(error)) from None
        except EngineError as error:
            raise ApiError(503, str(error), kind="server_error", retry_after=5) from None

    # ------------------------------------------------------------------ sampling options

    def _openai_params(self, body: Mapping[str, Any]) -> SamplingParams:
        params = SamplingParams(
            max_tokens=self.card.num_ctx or 4096,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            repeat_penalty=1.0,
        )
        n = body.get("n")
        if n not in (None, 1):
            raise ApiError(400, "only n=1 is supported")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None:
            value = int(_number(limit, "max_tokens", integer=True))
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
                setattr(params, attr, _number(body[key], key))
        if body.get("top_k") is not None:
            params.top_k = int(_number(body["top_k"], "top_k", integer=True))
        if body.get("seed") is not None:
            params.seed = int(_number(body["seed"], "seed", integer=True))
        params.stop = _stops(body.get("stop"), "stop")
        params.ignore_eos = bool(body.get("ignore_eos"))  # llama.cpp server's extension
        return params

    def _ollama_params(self, body: Mapping[str, Any]) -> tuple[SamplingParams, list[str]]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "options must be an object")
        notes: list[str] = []
        params = SamplingParams(max_tokens=self.card.num_ctx or 4096)
        predict = options.get("num_predict")
        if predict is not None:
            value = int(_number(predict, "options.num_predict", integer=True))
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
            "repeat_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            if options.get(key) is not None:
                setattr(params, key, _number(options[key], f"options.{key}"))
        for key in ("top_k", "repeat_last_n"):
            if options.get(key) is not None:
                setattr(params, key, int(_number(options[key], f"options.{key}", integer=True)))
        if params.repeat_last_n < 0:
            params.repeat_last_n = self.card.num_ctx
        if options.get("seed") is not None:
            params.seed = int(_number(options["seed"], "options.seed", integer=True))
        params.stop = _stops(options.get("stop"), "options.stop")
        params.ignore_eos = bool(options.get("ignore_eos") or body.get("ignore_eos"))
        if options.get("num_ctx") is not None and options.get("num_ctx") != self.card.num_ctx:
            notes.append(
                f"options.num_ctx={options.get('num_ctx')} ignored: slots are allocated at start "
                f"with num_ctx={self.card.num_ctx} (set OLLAMA_CONTEXT_LENGTH)"
            )
        for note in notes:
            log.info("%s", note)
        return params, notes

    # ------------------------------------------------------------------ running a request

    async def _collect(self, handle: RequestHandle) -> tuple[str, Finish]:
        parts: list[str] = []
        try:
            async for event in handle:
                if isinstance(event, TextChunk):
                    parts.append(event.text)
                else:
                    return "".join(parts), event
        finally:
            handle.cancel()  # no-op when finished; frees the slot when the client went away
        raise ApiError(500, "generation ended without a result", kind="server_error")

    def _raise_for_finish(self, finish: Finish) -> None:
        if finish.reason == "error":
            raise ApiError(500, f"generation failed: {finish.error}", kind="server_error")
        if finish.reason == "cancelled":
            raise ApiError(
                503, "request cancelled: server is shutting down", kind="server_error", retry_after=5
            )

    async def _stream(
        self,
        request: web.Request,
        handle: RequestHandle,
        dialect: Dialect,
        *,
        content_type: str,
        on_text: Callable[[str], bytes],
        on_finish: Callable[[Finish], bytes],
        on_error: Callable[[str], bytes],
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": content_type, "Cache-Control": "no-cache", **(headers or {})}
        )
        status: int | str = 200
        try:
            await response.prepare(request)
            async for event in handle:
                if isinstance(event, TextChunk):
                    await response.write(on_text(event.text))
                elif event.reason in ("stop", "length"):
                    await response.write(on_finish(event))
                    self.metrics.observe_duration(event.total_seconds)
                else:
                    status = 500 if event.reason == "error" else 503
                    await response.write(on_error(event.error or f"request {event.reason}"))
            await response.write_eof()
        except ConnectionResetError:
            status = 499  # the client went away (nginx's code); its slot is freed below
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            handle.cancel()
            self.metrics.count_request(dialect, status)
        return response

    # ------------------------------------------------------------------ OpenAI

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body, size = await self._sized_body(request)
        self._check_model(body, "openai")
        self._check_ready()
        if "messages" not in body:
            raise ApiError(400, "messages is required")
        prompt = await self._prompt(size, "openai", messages=body["messages"])
        return await self._openai_run(request, body, prompt, chat=True)

    async def openai_completions(self, request: web.Request) -> web.StreamResponse:
        body, size = await self._sized_body(request)
        self._check_model(body, "openai")
        self._check_ready()
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if isinstance(raw, str):
            prompt = await self._prompt(size, "openai", text=raw)
        elif (
            isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)
        ):
            if any(t < 0 or t >= self.engine.n_vocab for t in raw):
                raise ApiError(400, f"prompt token ids must lie in [0, {self.engine.n_vocab})")
            prompt = list(raw)
        else:
            raise ApiError(
                400, "prompt must be a string, a one-element list of strings or a list of token ids"
            )
        return await self._openai_run(request, body, prompt, chat=False)

    async def _openai_run(
        self, request: web.Request, body: Mapping[str, Any], prompt: list[int], *, chat: bool
    ) -> web.StreamResponse:
        params = self._openai_params(body)
        handle = self._submit(prompt, params, truncate=False)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = self.card.name
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
            text, finish = await self._collect(handle)
            self._raise_for_finish(finish)
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish.reason,
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}
            self.metrics.count_request("openai", 200)
            self.metrics.observe_duration(finish.total_seconds)
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

        def on_finish(finish: Finish) -> bytes:
            out = b""
            if chat and first[0]:
                out += sse(chunk("", None, role=True))
            out += sse(chunk(None if chat else "", finish.reason))
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

        return await self._stream(
            request,
            handle,
            "openai",
            content_type="text/event-stream",
            on_text=on_text,
            on_finish=on_finish,
            on_error=on_error,
        )

    async def openai_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._openai_model_card()]})

    async def openai_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not self.card.accepts(name):
            raise ApiError(404, f"The model `{name}` does not exist", kind="not_found_error")
        return web.json_response(self._openai_model_card())

    def _openai_model_card(self) -> dict[str, Any]:
        return {
            "id": self.card.name,
            "object": "model",
            "created": int(self.card.modified_at),
            "owned_by": "parallama",
        }

    # ------------------------------------------------------------------ Ollama

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        body, size = await self._sized_body(request)
        self._check_model(body, "ollama")
        self._check_ready()
        prompt_text = body.get("prompt") or ""
        if not isinstance(prompt_text, str):
            raise ApiError(400, "prompt must be a string")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise ApiError(400, "system must be a string")
        if not prompt_text and not system:
            # Ollama answers an empty prompt by loading the model; ours is loaded already
            self.metrics.count_request("ollama", 200)
            return web.json_response(
                {
                    "model": self.card.ollama_name,
                    "created_at": _now_rfc3339(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                }
            )
        truncate = self._ollama_truncate(body)
        if body.get("raw"):
            prompt = await self._prompt(size, "ollama", text=prompt_text, truncate=truncate)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt_text}
            ]
            prompt = await self._prompt(size, "ollama", messages=messages, truncate=truncate)
        return await self._ollama_run(request, body, prompt, chat=False)

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        body, size = await self._sized_body(request)
        self._check_model(body, "ollama")
        self._check_ready()
        messages = body.get("messages")
        if not messages:
            self.metrics.count_request("ollama", 200)
            return web.json_response(
                {
                    "model": self.card.ollama_name,
                    "created_at": _now_rfc3339(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "load",
                }
            )
        prompt = await self._prompt(size, "ollama", messages=messages, truncate=self._ollama_truncate(body))
        return await self._ollama_run(request, body, prompt, chat=True)

    async def _ollama_run(
        self, request: web.Request, body: Mapping[str, Any], prompt: list[int], *, chat: bool
    ) -> web.StreamResponse:
        params, notes = self._ollama_params(body)
        handle = self._submit(prompt, params, truncate=self._ollama_truncate(body))
        model = self.card.ollama_name
        headers = {"X-Parallama-Note": "; ".join(notes)} if notes else {}
        if handle.truncated:
            headers["X-Parallama-Truncated"] = "true"

        def piece(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": _now_rfc3339()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done
            return out

        def final(finish: Finish, text: str) -> dict[str, Any]:
            out = piece(text, True)
            out.update(
                {
                    "done_reason": finish.reason,
                    "total_duration": int(finish.total_seconds * 1e9),
                    "load_duration": 0,
                    "prompt_eval_count": finish.prompt_tokens,
                    "prompt_eval_duration": int(finish.prompt_seconds * 1e9),
                    "eval_count": finish.completion_tokens,
                    "eval_duration": int(finish.generation_seconds * 1e9),
                }
            )
            if not chat:
                out["context"] = []
            if notes:
                out["notes"] = notes
            return out

        if body.get("stream") is False:
            text, finish = await self._collect(handle)
            self._raise_for_finish(finish)
            self.metrics.count_request("ollama", 200)
            self.metrics.observe_duration(finish.total_seconds)
            return web.json_response(final(finish, text), headers=headers)

        def line(payload: Mapping[str, Any]) -> bytes:
            return json.dumps(payload, separators=(",", ":")).encode() + b"\n"

        return await self._stream(
            request,
            handle,
            "ollama",
            content_type="application/x-ndjson",
            headers=headers,
            on_text=lambda text: line(piece(text, False)),
            on_finish=lambda finish: line(final(finish, "")),
            on_error=lambda message: line({"error": message}),
        )

    def _ollama_model(self) -> dict[str, Any]:
        return {
            "name": self.card.ollama_name,
            "model": self.card.ollama_name,
            "modified_at": datetime.fromtimestamp(self.card.modified_at, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "size": self.card.size_bytes,
            "digest": "",
            "details": self.card.details(),
        }

    async def ollama_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self._ollama_model()]})

    async def ollama_ps(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"models": []})
        entry = self._ollama_model()
        del entry["modified_at"]
        forever = datetime.now(UTC) + timedelta(days=3650)
        entry.update(
            {
                "expires_at": forever.isoformat().replace("+00:00", "Z"),
                "size_vram": int(self.card.extra.get("size_vram", 0)),
                "context_length": self.card.num_ctx,
                "num_parallel": self.card.num_parallel,
            }
        )
        return web.json_response({"models": [entry]})

    async def ollama_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION, "parallama": __version__})

    async def ollama_show(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        wanted = body.get("model") or body.get("name")
        self._check_model({"model": wanted}, "ollama")
        return web.json_response(
            {
                "modelfile": f"FROM {self.card.path}\n",
                "parameters": f"num_ctx {self.card.num_ctx}\nnum_parallel {self.card.num_parallel}",
                "template": self.engine.chat_template or "",
                "details": self.card.details(),
                "model_info": {
                    "general.architecture": self.card.family,
                    **self.card.extra.get("model_info", {}),
                },
                "capabilities": ["completion"],
                "modified_at": self._ollama_model()["modified_at"],
            }
        )

    # ------------------------------------------------------------------ probes

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="parallama is running")

    def _scheduler_down(self) -> str | None:
        """Why the engine can no longer serve, or None. Only once it was started and while not
        shutting down: loading is alive (the model may take minutes), and a drain stops the
        scheduler on purpose."""
        if not self.ready or self.draining:
            return None
        if self.engine.failed:
            return "the scheduler failed; see the server log"
        if not self.engine.scheduler_alive():  # e.g. killed by a BaseException the engine cannot catch
            return "the scheduler thread has stopped; see the server log"
        return None

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: 503 once the scheduler is dead, so that Kubernetes restarts the pod (nothing
        else would: the listener still answers, every request would just fail)."""
        down = self._scheduler_down()
        if down is not None:
            return web.json_response({"status": "failed", "error": down}, status=503)
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.load_error:
            return web.json_response({"status": "failed", "error": self.load_error}, status=503)
        if not self.ready:
            return web.json_response({"status": "loading"}, status=503)
        down = self._scheduler_down()
        if down is not None:
            return web.json_response({"status": "failed", "error": down}, status=503)
        stats = self.engine.stats()
        return web.json_response({"status": "ready", "slots": stats.slots_total, "model": self.card.name})

    async def metrics_route(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

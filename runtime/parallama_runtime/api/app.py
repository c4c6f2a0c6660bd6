"""The HTTP application: one aiohttp app around one engine, the plumbing every route shares, health
probes and /metrics. The OpenAI routes (:mod:`.openai`) and the Ollama routes (:mod:`.ollama`) are
built on the helpers here.

The API speaks to the engine only through its Python interface (tokenize, submit, stats) and never
imports llama.cpp. Every failure a client can cause is a 4xx with a JSON message in the dialect of
the route; unexpected failures are a 500 with a generic message and the traceback goes to the
server log, never to the client.

Work a request causes is bounded before it is done (see :class:`.common.RequestLimits`): the body
size is checked against the Content-Length before the body is read, a prompt whose byte count alone
proves it longer than a slot is refused before it is tokenized, and large prompts are rendered and
tokenized on a small thread pool so that one huge request does not stall every stream and probe on
the event loop.

A client that goes away cancels its engine request: streaming handlers notice it on the next write,
and the app runs with aiohttp's ``handler_cancellation`` so a non-streaming handler is cancelled on
disconnect; both paths end in ``handle.cancel()``, which frees the slot and its KV cells.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from aiohttp import web

from ..engine import (
    Engine,
    EngineError,
    Finish,
    GrammarError,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TextChunk,
    TokenLogprob,
)
from ..engine.chat_template import TemplateError, render_chat
from ..metrics import CONTENT_TYPE, RuntimeMetrics
from .common import ARRIVED, MIB, ApiError, Dialect, ModelCard, RequestLimits, error_body
from .embeddings import EmbeddingRoutes
from .ollama import OllamaRoutes
from .openai import OpenAIRoutes

__all__ = ["RuntimeAPI"]

log = logging.getLogger(__name__)


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
        self.openai = OpenAIRoutes(self)
        self.ollama = OllamaRoutes(self)
        self.app.add_routes(self.openai.routes())
        self.app.add_routes(self.ollama.routes())
        self.app.add_routes(EmbeddingRoutes(self).routes())
        self.app.add_routes(
            [
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
        request[ARRIVED] = time.perf_counter()  # Ollama's total_duration starts here
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
        if request.path.startswith(("/v1/", "/api/generate", "/api/chat", "/api/embed")):
            self.metrics.count_request(dialect, error.status)
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return web.json_response(error_body(dialect, error), status=error.status, headers=headers)

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

    async def body(self, request: web.Request) -> dict[str, Any]:
        return (await self.sized_body(request))[0]

    async def sized_body(self, request: web.Request) -> tuple[dict[str, Any], int]:
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

    def check_ready(self, *, embeddings: bool = False) -> None:
        """Loaded, not draining, and serving what the route asks: an embedding model serves the
        embedding routes only, a generative model the others (Ollama's words for the refusal)."""
        if self.draining:
            raise ApiError(503, "server is shutting down", kind="server_error", retry_after=5)
        if not self.ready:
            why = f"model failed to load: {self.load_error}" if self.load_error else "model is still loading"
            raise ApiError(503, why, kind="server_error", retry_after=2)
        if self.engine.embedding_model != embeddings:
            serves = "embeddings" if embeddings else "generate"
            raise ApiError(400, f"this model does not support {serves}", param="model")

    def check_model(self, body: Mapping[str, Any], dialect: Dialect) -> None:
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

    def tokens(self, text: str, dialect: Dialect, *, truncate: bool = False) -> list[int]:
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

    async def prompt(
        self,
        body_bytes: int,
        dialect: Dialect,
        *,
        text: str | None = None,
        messages: Any = None,
        truncate: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Render (when ``messages``, offering ``tools``) and tokenize, on the prep pool when the body
        is large."""

        def work() -> list[int]:
            prompt = self.chat_prompt(messages, tools) if text is None else text
            return self.tokens(prompt, dialect, truncate=truncate)

        if body_bytes <= self.limits.OFFLOAD_BYTES:
            return work()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, work)

    def chat_prompt(self, messages: Any, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        try:
            return render_chat(
                self.engine.chat_template,
                messages,
                tools=tools,
                bos_token=self.engine.bos_text,
                eos_token=self.engine.eos_text,
            )
        except TemplateError as error:
            raise ApiError(400, str(error), param=error.param) from None

    def submit(self, prompt: list[int], params: SamplingParams, *, truncate: bool) -> RequestHandle:
        try:
            return self.engine.submit(prompt, params, truncate=truncate)
        except QueueFullError as error:
            raise ApiError(503, str(error), kind="server_error", retry_after=1) from None
        except PromptTooLongError as error:
            raise ApiError(400, str(error)) from None
        except GrammarError as error:  # the output format the request asks for
            raise ApiError(400, f"cannot constrain the output: {error}") from None
        except EngineError as error:
            raise ApiError(503, str(error), kind="server_error", retry_after=5) from None

    # ------------------------------------------------------------------ running a request

    async def collect(
        self, handle: RequestHandle, logprobs: list[TokenLogprob] | None = None
    ) -> tuple[str, Finish]:
        """The whole answer; its tokens' logprob entries go into ``logprobs`` when given."""
        parts: list[str] = []
        try:
            async for event in handle:
                if isinstance(event, TextChunk):
                    parts.append(event.text)
                    if logprobs is not None:
                        logprobs.extend(event.logprobs)
                else:
                    return "".join(parts), event
        finally:
            handle.cancel()  # no-op when finished; frees the slot when the client went away
        raise ApiError(500, "generation ended without a result", kind="server_error")

    def raise_for_finish(self, finish: Finish) -> None:
        if finish.reason == "error":
            raise ApiError(500, f"generation failed: {finish.error}", kind="server_error")
        if finish.reason == "cancelled":
            raise ApiError(
                503, "request cancelled: server is shutting down", kind="server_error", retry_after=5
            )

    async def stream(
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
        on_chunk: Callable[[TextChunk], bytes] | None = None,
    ) -> web.StreamResponse:
        """Write the events as they come; ``on_chunk``, when given, formats a text chunk instead of
        ``on_text`` (for what a chunk carries besides its text: logprobs)."""
        response = web.StreamResponse(
            headers={"Content-Type": content_type, "Cache-Control": "no-cache", **(headers or {})}
        )
        status: int | str = 200
        try:
            await response.prepare(request)
            async for event in handle:
                if isinstance(event, TextChunk):
                    await response.write(on_text(event.text) if on_chunk is None else on_chunk(event))
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

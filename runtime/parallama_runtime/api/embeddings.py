"""The embedding routes: Ollama's ``/api/embed`` and legacy ``/api/embeddings``, OpenAI's
``/v1/embeddings``. They answer on a runtime serving an embedding model (see
:mod:`..engine.embedding`); on a generative one they are a 400, as generation is on this one.

What each API does with the vectors, followed here:

* ``/api/embed`` (Ollama): L2-normalised; ``dimensions`` keeps the first values and renormalises
  (Matryoshka); ``truncate`` defaults to true and keeps the first ``num_ctx`` tokens of an input
  that is too long, false makes it a 400. An absent or empty ``input`` is Ollama's "load the model"
  answer, an empty embedding list; an empty string in a list is a 400 (nothing to embed).
* ``/api/embeddings`` (Ollama's deprecated route): the vector as the model pools it, not
  normalised (Ollama does not normalise here either); an empty ``prompt`` answers an empty
  embedding, Ollama's load answer. Ollama has no truncation on this route: too long is a 400.
* ``/v1/embeddings`` (OpenAI): unit vectors, ``dimensions`` as above, ``encoding_format`` float or
  base64 (little-endian float32, what OpenAI's client decodes), ``input`` a string, strings, token
  ids or lists of token ids; no truncation (OpenAI has none): too long is a 400 naming the input.

Ollama's ``options`` change nothing about an embedding: the sampling ones are accepted (there is
nothing to sample), the load-time ones are noted as for generation (``X-Parallama-Note``), unknown
ones are a 400. How many inputs one request may carry is bounded by the size of its answer
(:data:`MAX_RESPONSE_VALUES`), and for OpenAI by its documented 2048.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engine import EngineError, QueueFullError
from ..engine.embedding import (
    EmbeddingCancelledError,
    EmbeddingResult,
    EmptyInputError,
    InputTooLongError,
    Vector,
    normalize,
    shorten,
)
from .common import ARRIVED, ApiError, Dialect
from .fields import OLLAMA_DEPLOYMENT_OPTIONS, OLLAMA_OPTIONS, RouteFields

if TYPE_CHECKING:
    from .app import RuntimeAPI

__all__ = [
    "MAX_OPENAI_INPUTS",
    "MAX_RESPONSE_VALUES",
    "OLLAMA_EMBED",
    "OLLAMA_EMBEDDINGS",
    "OLLAMA_EMBED_OPTIONS",
    "OPENAI_EMBEDDINGS",
    "EmbeddingRoutes",
]

MAX_OPENAI_INPUTS = 2048
"""OpenAI's limit on the inputs of one request."""

MAX_RESPONSE_VALUES = 1 << 24
"""Inputs x dimensions one request may ask for: 16 M floats, ~64 MiB as float32 and a few hundred MiB
of JSON, so one request cannot make the server build an answer of gigabytes (16384 inputs of a
1024-dimensional model)."""

OLLAMA_EMBED = RouteFields(
    where="",
    honoured=frozenset({"model", "input", "truncate", "dimensions", "options", "keep_alive"}),
)
OLLAMA_EMBEDDINGS = RouteFields(
    where="",
    honoured=frozenset({"model", "prompt", "options", "keep_alive"}),
)
OLLAMA_EMBED_OPTIONS = RouteFields(
    where="options.",
    # sampling options have nothing to act on in an embedding, in Ollama as here
    honoured=OLLAMA_OPTIONS.honoured | frozenset(OLLAMA_OPTIONS.refused_values),
    deployment=OLLAMA_DEPLOYMENT_OPTIONS,
)


def _encoding(value: Any) -> str | None:
    return None if value in ("float", "base64") else 'the encoding is "float" or "base64"'


OPENAI_EMBEDDINGS = RouteFields(
    where="",
    # user: an end-user id for OpenAI's abuse monitoring, nothing for a self-hosted server to do
    honoured=frozenset({"model", "input", "dimensions", "user"}),
    refused_values={"encoding_format": _encoding},
)


class EmbeddingRoutes:
    """The embedding handlers, on the shared plumbing of :class:`.app.RuntimeAPI`."""

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/embed", self.embed),
            web.post("/api/embeddings", self.embeddings),
            web.post("/v1/embeddings", self.openai),
        ]

    # ------------------------------------------------------------------ Ollama

    async def embed(self, request: web.Request) -> web.Response:
        body, size = await self.api.sized_body(request)
        self.api.check_model(body, "ollama")
        OLLAMA_EMBED.check(body)
        notes = self._options(body)
        self.api.check_ready(embeddings=True)
        texts, names = self._ollama_input(body.get("input"))
        truncate = self._truncate(body)
        dimensions = self._dimensions(body.get("dimensions"), allow_zero=True)
        model = self.api.card.ollama_name
        if not texts:  # Ollama's answer to a request that only loads the model
            self.api.metrics.count_request("ollama", 200)
            return web.json_response({"model": model, "embeddings": []})
        self._check_count(len(texts), dimensions, "input")
        tokens = await self._tokenize(size, texts, names, "ollama", truncate=truncate)
        result = await self._run(tokens, names, "ollama", truncate=truncate)
        vectors = [shorten(self._unit(vector), dimensions) for vector in result.vectors]
        payload: dict[str, Any] = {
            "model": model,
            "embeddings": [vector.tolist() for vector in vectors],
            "total_duration": int(self._elapsed(request, result) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }
        if notes:
            payload["notes"] = notes
        return self._respond("ollama", payload, result, notes)

    async def embeddings(self, request: web.Request) -> web.Response:
        body, size = await self.api.sized_body(request)
        self.api.check_model(body, "ollama")
        OLLAMA_EMBEDDINGS.check(body)
        notes = self._options(body)
        self.api.check_ready(embeddings=True)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        if not prompt:  # Ollama's load answer
            self.api.metrics.count_request("ollama", 200)
            return web.json_response({"embedding": []})
        tokens = await self._tokenize(size, [prompt], ["prompt"], "legacy", truncate=False)
        result = await self._run(tokens, ["prompt"], "legacy", truncate=False)
        # not normalised: Ollama's legacy route returns the vector as the model pools it
        return self._respond("ollama", {"embedding": result.vectors[0].tolist()}, result, notes)

    def _options(self, body: Mapping[str, Any]) -> list[str]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "options must be an object", param="options")
        return [
            note
            for name in OLLAMA_EMBED_OPTIONS.check(options)
            for note in self.api.ollama._deployment_note(name, options[name])
        ]

    def _truncate(self, body: Mapping[str, Any]) -> bool:
        """Ollama's ``truncate``, true unless the request says false (``options.truncate`` too)."""
        options = body.get("options") or {}
        for name, value in (
            ("truncate", body.get("truncate")),
            ("options.truncate", options.get("truncate")),
        ):
            if value is not None:
                if not isinstance(value, bool):
                    raise ApiError(400, f"{name} must be true or false", param=name)
                return value
        return True

    def _ollama_input(self, value: Any) -> tuple[list[str], list[str]]:
        if value is None or value == "":
            return [], []
        if isinstance(value, str):
            return [value], ["input"]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value), [f"input[{i}]" for i in range(len(value))]
        raise ApiError(400, "input must be a string or a list of strings", param="input")

    # ------------------------------------------------------------------ OpenAI

    async def openai(self, request: web.Request) -> web.Response:
        body, size = await self.api.sized_body(request)
        self.api.check_model(body, "openai")
        OPENAI_EMBEDDINGS.check(body)
        self.api.check_ready(embeddings=True)
        dimensions = self._dimensions(body.get("dimensions"), allow_zero=False)
        texts, ids, names = self._openai_input(body.get("input"))
        self._check_count(len(names), dimensions, "input", limit=MAX_OPENAI_INPUTS)
        if texts is not None:
            tokens = await self._tokenize(size, texts, names, "openai", truncate=False)
        else:
            assert ids is not None
            tokens = ids
        result = await self._run(tokens, names, "openai", truncate=False)
        base64_wanted = body.get("encoding_format") == "base64"
        data = []
        for index, vector in enumerate(result.vectors):
            unit = shorten(self._unit(vector), dimensions)
            embedding: Any = (
                base64.b64encode(unit.astype("<f4").tobytes()).decode("ascii")
                if base64_wanted
                else unit.tolist()
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        payload = {
            "object": "list",
            "data": data,
            "model": self.api.card.name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
        return self._respond("openai", payload, result, [])

    def _openai_input(self, value: Any) -> tuple[list[str] | None, list[list[int]] | None, list[str]]:
        """OpenAI's four shapes: a string, strings, token ids, lists of token ids."""
        shapes = "input must be a string, a list of strings, a list of token ids or a list of such lists"
        if value is None:
            raise ApiError(400, "input is required", param="input")
        if isinstance(value, str):
            if not value:
                raise ApiError(400, "input must not be empty", param="input")
            return [value], None, ["input"]
        if not isinstance(value, list):
            raise ApiError(400, shapes, param="input")
        if not value:
            raise ApiError(400, "input must not be an empty list", param="input")
        if all(isinstance(item, str) for item in value):
            return list(value), None, [f"input[{i}]" for i in range(len(value))]
        if all(_is_token(item) for item in value):
            self._check_ids(value, "input")
            return None, [list(value)], ["input"]
        if all(isinstance(item, list) for item in value):
            names = [f"input[{i}]" for i in range(len(value))]
            for item, name in zip(value, names, strict=True):
                if not item:
                    raise ApiError(400, f"{name} is empty", param=name)
                if not all(_is_token(token) for token in item):
                    raise ApiError(400, f"{name} must be a list of token ids", param=name)
                self._check_ids(item, name)
            return None, [list(item) for item in value], names
        raise ApiError(400, shapes, param="input")

    def _check_ids(self, ids: list[int], name: str) -> None:
        n_vocab = self.api.engine.n_vocab
        if any(token < 0 or token >= n_vocab for token in ids):
            raise ApiError(400, f"{name}: token ids lie in [0, {n_vocab})", param=name)

    # ------------------------------------------------------------------ shared

    def _dimensions(self, value: Any, *, allow_zero: bool) -> int | None:
        """``dimensions`` in [1, the model's]; Ollama reads 0 as "not set" (Go's zero value)."""
        if value is None or (allow_zero and value == 0 and not isinstance(value, bool)):
            return None
        n_embd = self.api.engine.n_embd
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n_embd:
            raise ApiError(
                400,
                f"dimensions must be an integer from 1 to {n_embd} (the model's), got {value!r}",
                param="dimensions",
            )
        return value

    def _check_count(self, count: int, dimensions: int | None, name: str, *, limit: int = 0) -> None:
        values = count * (dimensions or self.api.engine.n_embd)
        most = min(limit or count, MAX_RESPONSE_VALUES // max(dimensions or self.api.engine.n_embd, 1))
        if count > most:
            raise ApiError(
                400,
                f"{name} holds {count} inputs but one request may hold at most {most} "
                f"({values} values asked for); send several requests",
                param=name,
            )

    async def _tokenize(
        self, body_bytes: int, texts: list[str], names: list[str], route: str, *, truncate: bool
    ) -> list[list[int]]:
        """Tokenize every input (on the API's prep pool when the body is large), refusing an empty
        one, and when not truncating one whose size alone proves it longer than a slot."""
        limits = self.api.limits
        engine = self.api.engine

        def work() -> list[list[int]]:
            out = []
            for text, name in zip(texts, names, strict=True):
                if not text:
                    raise ApiError(400, f"{name} is empty: there is nothing to embed", param=name)
                if not truncate:
                    at_least = limits.min_tokens(text)
                    if at_least > limits.num_ctx:
                        raise ApiError(
                            400,
                            f"{name} is at least {at_least} tokens (no token of this model is longer "
                            f"than {limits.token_bytes} bytes) but the context of a slot holds "
                            f"{limits.num_ctx} (num_ctx); {_FIX[route]}",
                            param=name,
                        )
                try:
                    out.append(engine.tokenize(text, add_special=True, parse_special=True))
                except UnicodeEncodeError as error:  # JSON may carry lone surrogates ("\ud800")
                    raise ApiError(
                        400, f"{name} is not valid Unicode: {error.reason} at {error.start}", param=name
                    ) from None
            return out

        if body_bytes <= limits.OFFLOAD_BYTES:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.api._pool, work)

    async def _run(
        self, tokens: list[list[int]], names: list[str], route: str, *, truncate: bool
    ) -> EmbeddingResult:
        try:
            future = self.api.engine.submit_embeddings(tokens, truncate=truncate)
        except InputTooLongError as error:
            name = names[error.index]
            raise ApiError(
                400,
                f"{name} is {error.length} tokens but the context of a slot holds {error.limit} "
                f"(num_ctx); {_FIX[route]}",
                param=name,
            ) from None
        except EmptyInputError as error:
            name = names[error.index]
            raise ApiError(400, f"{name} has no tokens: there is nothing to embed", param=name) from None
        except QueueFullError as error:
            raise ApiError(503, str(error), kind="server_error", retry_after=1) from None
        except EngineError as error:
            raise ApiError(503, str(error), kind="server_error", retry_after=5) from None
        try:
            return await future
        except EmbeddingCancelledError as error:
            raise ApiError(503, str(error), kind="server_error", retry_after=5) from None
        except EngineError as error:
            raise ApiError(500, f"embedding failed: {error}", kind="server_error") from None

    def _unit(self, vector: Vector) -> Vector:
        try:
            return normalize(vector)
        except ValueError as error:
            raise ApiError(500, f"the model's embedding is unusable: {error}", kind="server_error") from None

    def _elapsed(self, request: web.Request, result: EmbeddingResult) -> float:
        arrived = request.get(ARRIVED)
        return time.perf_counter() - arrived if isinstance(arrived, float) else result.total_seconds

    def _respond(
        self, dialect: Dialect, payload: Mapping[str, Any], result: EmbeddingResult, notes: list[str]
    ) -> web.Response:
        headers = {}
        if notes:
            headers["X-Parallama-Note"] = "; ".join(notes)
        if result.truncated:
            headers["X-Parallama-Truncated"] = "true"
        self.api.metrics.count_request(dialect, 200)
        self.api.metrics.observe_duration(result.total_seconds)
        return web.json_response(payload, headers=headers)


_FIX = {
    "ollama": 'shorten it or send "truncate": true (the default)',
    "legacy": "shorten it (or use /api/embed, which truncates)",
    "openai": "shorten it (or use the Ollama API's /api/embed, which truncates)",
}
"""What a client can do about an input longer than a slot, per route."""


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

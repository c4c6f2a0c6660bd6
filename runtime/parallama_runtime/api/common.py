"""What the OpenAI and Ollama routes share: errors in each dialect, request bounds, the model card
and small validators for request fields.

Every failure a client can cause is an :class:`ApiError`: a 4xx with a JSON message in the dialect
of the route (OpenAI ``{"error": {...}}``, Ollama ``{"error": "..."}``).
"""

from __future__ import annotations

import importlib.metadata as _metadata
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "ARRIVED",
    "MIB",
    "OLLAMA_VERSION",
    "ApiError",
    "Dialect",
    "ModelCard",
    "RequestLimits",
    "__version__",
    "error_body",
    "now_rfc3339",
    "number",
    "stops",
]

Dialect = Literal["openai", "ollama"]

try:
    __version__ = _metadata.version("parallama")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

OLLAMA_VERSION = "0.12.11"
"""The Ollama API version this surface follows (clients check it for feature support): 0.12.11 is
the release that added ``logprobs`` and ``top_logprobs``, the newest feature served here."""


MIB = 1024 * 1024

ARRIVED: web.RequestKey[float] | str = (
    web.RequestKey("parallama_arrived", float) if hasattr(web, "RequestKey") else "parallama.arrived"
)
"""Request storage key of the ``time.perf_counter()`` at which a request reached the app (set by its
middleware), where Ollama's ``total_duration`` starts: before the body is read and the prompt built.
A typed key where aiohttp has them (3.14; a plain string key warns there), a string before."""


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
    """A failure the client caused (4xx) or must wait out (503), in words the client can act on.

    ``param`` names the request field at fault, as OpenAI's error object does; Ollama's error shape
    has only the message, so the message names the field too."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        retry_after: int = 0,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
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
    context_length: int = 0
    """The model's own context (``{arch}.context_length``), not the slots' ``num_ctx``."""
    embedding_length: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ollama_name(self) -> str:
        return self.name if ":" in self.name else f"{self.name}:latest"

    def accepts(self, wanted: str) -> bool:
        return wanted in (self.name, self.ollama_name)

    def details(self) -> dict[str, Any]:
        """Ollama's ``ModelDetails``; its lengths, like Ollama's, only when known."""
        details: dict[str, Any] = {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family] if self.family else None,
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }
        if self.context_length:
            details["context_length"] = self.context_length
        if self.embedding_length:
            details["embedding_length"] = self.embedding_length
        return details


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def error_body(dialect: Dialect, error: ApiError) -> dict[str, Any]:
    if dialect == "openai":
        return {
            "error": {
                "message": error.message,
                "type": error.kind,
                "param": error.param,
                "code": error.status,
            }
        }
    return {"error": error.message}


def number(value: Any, name: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(
            400, f"{name} must be a {'integer' if integer else 'number'}, got {json.dumps(value)}", param=name
        )
    if integer and not float(value).is_integer():
        raise ApiError(400, f"{name} must be an integer, got {value}", param=name)
    return float(value)


def stops(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    raise ApiError(400, f"{name} must be a string or a list of strings", param=name)

"""Which request fields each route honours; anything else is a 400 that names it.

A client that sends ``tools`` and gets free text back, or ``n: 3`` and gets one answer, has been
lied to. So every field of every generation route is in one of three lists here:

* **honoured**: the runtime does what the field asks (its value is checked where it is used);
* **refused values**: the field is known and some values are honoured (``n: 1``, ``echo: false``,
  an empty ``images`` list), every other value is a 400 saying why;
* **deployment settings**: Ollama options that choose how a model is loaded (``num_ctx``,
  ``num_gpu``...). The operator's plan fixed them when the pod started, so they cannot change per
  request; a request that asks for another value is served with the deployment's and told so in the
  ``X-Parallama-Note`` header and the response's ``notes``, as before (a 400 would break the many
  clients that always send their own ``num_ctx``).

A field in none of the lists is unknown: a 400 too, since it is most likely a typo or a feature of
another server that this one does not have. docs/runtime.md lists the same tables for users.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .common import ApiError

__all__ = [
    "OLLAMA_CHAT",
    "OLLAMA_DEPLOYMENT_OPTIONS",
    "OLLAMA_GENERATE",
    "OLLAMA_OPTIONS",
    "OPENAI_CHAT",
    "OPENAI_COMPLETIONS",
    "RouteFields",
]

Check = Callable[[Any], str | None]
"""Given a field's value: None when honoured, else why not (a sentence fragment)."""


def _only(*allowed: Any, why: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in allowed else why

    return check


def _falsy(why: str) -> Check:
    def check(value: Any) -> str | None:
        return None if not value else why

    return check


@dataclass(frozen=True)
class RouteFields:
    """The fields of one route's body (or of Ollama's ``options`` object)."""

    where: str
    """How the error names the object: "" for the body, "options." for Ollama's options."""
    honoured: frozenset[str]
    refused_values: Mapping[str, Check] = field(default_factory=dict)
    deployment: frozenset[str] = frozenset()

    def check(self, body: Mapping[str, Any]) -> list[str]:
        """The deployment settings the body sets (for the caller's note); raises on the rest."""
        settings = []
        for name, value in body.items():
            if name in self.honoured or value is None:
                continue
            full = f"{self.where}{name}"
            if name in self.refused_values:
                why = self.refused_values[name](value)
                if why is not None:
                    raise ApiError(400, f"{full}={_show(value)} is not supported: {why}", param=full)
            elif name in self.deployment:
                settings.append(name)
            else:
                raise ApiError(400, f"unknown field {full}: this server does not implement it", param=full)
        return settings


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 40 else text[:37] + "..."


_SAMPLING_EXTENSIONS = frozenset({"top_k", "min_p", "repeat_penalty", "ignore_eos"})
"""llama.cpp server's extensions to OpenAI's bodies, honoured the same way."""

_TEXT_ONLY = "this runtime serves text-only models"

OPENAI_CHAT = RouteFields(
    where="",
    honoured=frozenset(
        {
            "model",
            "messages",
            "stream",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "logprobs",
            "top_logprobs",
            "response_format",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "logit_bias",
            # identify the end user or the caller for abuse monitoring: nothing for a self-hosted
            # server to do, and nothing a client expects back
            "user",
            "safety_identifier",
            "prompt_cache_key",  # a routing hint for OpenAI's cache; ours finds prefixes itself
        }
    )
    | _SAMPLING_EXTENSIONS,
    refused_values={
        "n": _only(1, why="one choice per request; send several requests"),
        "stream_options": lambda value: (
            None
            if isinstance(value, dict) and set(value) <= {"include_usage"}
            else "only include_usage is implemented"
        ),
        "modalities": _only(["text"], why=_TEXT_ONLY),
        "audio": _falsy(_TEXT_ONLY),
        "prediction": _falsy("predicted outputs are not implemented"),
        "store": _falsy("this server does not store completions"),
        "metadata": _falsy("metadata is kept only with store, which this server does not do"),
        "service_tier": _only("auto", "default", why="one service tier"),
        "reasoning_effort": _falsy("the served model's reasoning is not configurable"),
        "verbosity": _falsy("the served model's verbosity is not configurable"),
        "web_search_options": _falsy("no web search"),
        "functions": _falsy("use tools (functions is OpenAI's deprecated form)"),
        "function_call": _falsy("use tool_choice (function_call is OpenAI's deprecated form)"),
    },
)

OPENAI_COMPLETIONS = RouteFields(
    where="",
    honoured=frozenset(
        {
            "model",
            "prompt",
            "stream",
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "logprobs",
            "logit_bias",
            "user",
        }
    )
    | _SAMPLING_EXTENSIONS,
    refused_values={
        "n": _only(1, why="one choice per request; send several requests"),
        "best_of": _only(1, why="one candidate per request"),
        "echo": _falsy("the prompt is not echoed back"),
        "suffix": _falsy("fill-in-the-middle is not implemented"),
        "stream_options": OPENAI_CHAT.refused_values["stream_options"],
    },
)

_OLLAMA_COMMON = frozenset(
    {
        "model",
        "stream",
        "format",
        "options",
        "truncate",
        "logprobs",
        "top_logprobs",
        "ignore_eos",
        # the model stays loaded for the pod's life: there is nothing to keep alive or unload
        "keep_alive",
    }
)
_OLLAMA_COMMON_REFUSED: dict[str, Check] = {
    "think": _falsy("the served model has no thinking mode in this runtime"),
    "images": _falsy(_TEXT_ONLY),
}

OLLAMA_GENERATE = RouteFields(
    where="",
    honoured=_OLLAMA_COMMON | {"prompt", "system", "raw"},
    refused_values={
        **_OLLAMA_COMMON_REFUSED,
        "suffix": _falsy("fill-in-the-middle is not implemented"),
        "template": _falsy("the model's own chat template is used; send raw=true with your own prompt"),
        "context": _falsy("the deprecated context tokens are not kept; send the conversation to /api/chat"),
    },
)

OLLAMA_CHAT = RouteFields(
    where="",
    honoured=_OLLAMA_COMMON | {"messages", "tools"},
    refused_values=_OLLAMA_COMMON_REFUSED,
)

OLLAMA_DEPLOYMENT_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "vocab_only",
        "f16_kv",
    }
)

OLLAMA_OPTIONS = RouteFields(
    where="options.",
    honoured=frozenset(
        {
            "num_predict",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "typical_p",
            "repeat_penalty",
            "repeat_last_n",
            "frequency_penalty",
            "presence_penalty",
            "seed",
            "stop",
            "truncate",
            "ignore_eos",
        }
    ),
    refused_values={
        "mirostat": _only(0, why="mirostat sampling is not implemented"),
        "mirostat_tau": lambda _: None,  # meaningless without mirostat, which is refused above
        "mirostat_eta": lambda _: None,
        "penalize_newline": _falsy("Ollama removed it; newlines are penalised like other tokens"),
        "tfs_z": _only(1, 1.0, why="tail-free sampling was removed from llama.cpp"),
        "num_keep": lambda _: "truncation keeps the BOS token and the end of the prompt",
    },
    deployment=OLLAMA_DEPLOYMENT_OPTIONS,
)

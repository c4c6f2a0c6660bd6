"""The engine: one llama.cpp model and context, N slots over one KV pool, a continuous-batching
scheduler with a prompt cache. The API talks to it through :class:`Engine` and the value types
re-exported here; nothing outside this package touches llama.cpp while serving.

Modules: :mod:`.values` (config, events, errors), :mod:`.scheduler` (the loop),
:mod:`.prompt_cache` (which cells the pool keeps and shares), :mod:`.sampling` (samplers, stop
sequences), :mod:`.grammar` (constrained sampling), :mod:`.requests` (a request's state and
handle), :mod:`.binding` (llama.cpp calls), :mod:`.llama_log` (llama.cpp's log),
:mod:`.chat_template` (Jinja chat templates)."""

from .requests import RequestHandle
from .scheduler import Engine
from .values import (
    EngineConfig,
    EngineError,
    EngineLoadError,
    EngineObserver,
    EngineStats,
    Finish,
    GrammarError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    TextChunk,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineLoadError",
    "EngineObserver",
    "EngineStats",
    "Finish",
    "GrammarError",
    "PromptTooLongError",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TextChunk",
    "TokenLogprob",
    "TopLogprob",
]

"""The engine: one llama.cpp model and context, N slots over one KV pool, a continuous-batching
scheduler with a prompt cache. The API talks to it through :class:`Engine` and the value types
re-exported here; nothing outside this package touches llama.cpp while serving."""

from .scheduler import (
    Engine,
    EngineConfig,
    EngineError,
    EngineLoadError,
    EngineObserver,
    EngineStats,
    Finish,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TextChunk,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineLoadError",
    "EngineObserver",
    "EngineStats",
    "Finish",
    "PromptTooLongError",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TextChunk",
]

"""What crosses the engine's boundary: its configuration, a request's sampling settings, the events
a request yields, the statistics the metrics layer reads and the errors the API maps to status codes.

Plain values only, so the API and the metrics can be read (and tested) without llama.cpp."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..planning.memory import KVCacheType, MemoryConfig
from ..termination import Failure

DEFAULT_PREFILL_BUDGET = 256
"""Prompt tokens per step while other requests are generating. A step's time grows with its tokens,
and every generating stream waits for the whole step, so this bounds their inter-token latency while
a long prompt arrives: 256 tokens cost a few times one decode step on a CPU and a small fraction of a
millisecond per token on a GPU, while still keeping the matrix products wide enough to be efficient.
With nothing generating, prefill runs at the full batch size."""


class EngineError(RuntimeError):
    """The engine cannot take or finish a request (not loaded, shutting down, decode failure)."""


class EngineLoadError(EngineError):
    """llama.cpp could not load the model or create the context; ``failure`` says why, in the
    termination message's terms (an allocation failure, an unreadable file...)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


class QueueFullError(EngineError):
    """Every slot is busy and the waiting queue is at its bound; the client should retry later."""


class PromptTooLongError(EngineError):
    """The prompt does not fit one slot's context and the request did not ask to truncate."""


class GrammarError(EngineError):
    """llama.cpp refused the request's grammar (a syntax error, an undefined rule, left recursion,
    repetitions beyond its limits): the request is at fault, not the server."""


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    num_parallel: int = 1
    """Slots: requests generating at the same time."""
    num_ctx: int = 4096
    """Tokens one request may hold (prompt and answer); the pool holds ``num_ctx x num_parallel``."""
    kv_cache_type: KVCacheType = KVCacheType.F16
    flash_attention: bool = True
    gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()
    threads: int | None = None
    """llama.cpp's threads; None: the CPUs the container may use (its cgroup quota)."""
    max_queue: int = 64
    n_batch: int = 512
    swa_full: bool = False
    """Full-size caches for sliding-window layers; False keeps llama-server's small window cache."""
    prefill_budget: int = DEFAULT_PREFILL_BUDGET
    """Prompt tokens per step while other requests generate (see :data:`DEFAULT_PREFILL_BUDGET`)."""
    prompt_cache: bool = True
    """Keep a finished request's cells for later requests that share its prefix."""

    @property
    def memory_config(self) -> MemoryConfig:
        """The layout the engine creates, in the memory model's terms: one unified pool."""
        return MemoryConfig(
            num_ctx=self.num_ctx,
            num_parallel=self.num_parallel,
            kv_cache_type=self.kv_cache_type,
            flash_attention=self.flash_attention,
            n_ubatch=self.n_batch,
            swa_full=self.swa_full,
            kv_unified=True,
            # the engine's ids: the memory model's rule with the cache on, one per slot without it
            n_seq_max=None if self.prompt_cache else self.num_parallel,
        )


@dataclass
class SamplingParams:
    """Per-request sampling; defaults are Ollama's. ``temperature <= 0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    """Locally typical sampling (llama.cpp's ``typ_p``); 1.0 is off."""
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Added to a token's logit before sampling (OpenAI's ``logit_bias``); -inf bans the token."""
    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens (benchmarks and tests want fixed lengths).
    Under a ``grammar`` an end-of-generation token still ends the request: the grammar lets one
    through only once its text is complete, so it marks the grammar's end, not the model's choice."""
    grammar: str | None = None
    """GBNF text (root rule ``root``) the answer must match: llama.cpp's grammar sampler constrains
    every sampled token (see :mod:`.grammar`). An invalid grammar is refused at submit
    (:class:`GrammarError`)."""
    logprobs: int | None = None
    """None: no logprobs. 0..20: each token's log-probability and that many most likely
    alternatives (see :mod:`.logprobs` for which distribution and which chunk carries them)."""


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position; ``bytes`` are the token's own bytes."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextChunk:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    """The entries of the tokens whose text this chunk completes (requests that asked for them)."""


@dataclass(frozen=True)
class Finish:
    """Last event of a request: why it ended and its timings (seconds)."""

    reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    prompt_seconds: float
    generation_seconds: float
    total_seconds: float
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens whose cells came from the prompt cache instead of being computed."""


Event = TextChunk | Finish


class EngineObserver(Protocol):
    """Hooks the metrics layer implements; called from the scheduler thread, so they must be cheap."""

    def on_admitted(self, queue_seconds: float, prompt_tokens: int, cached_tokens: int) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_inter_token(self, seconds: Sequence[float]) -> None: ...

    def on_finished(self, finish: Finish) -> None: ...


@dataclass
class EngineStats:
    slots_total: int
    slots_busy: int
    slots_busy_max: int
    queue_depth: int
    queue_depth_max: int
    kv_cells_used: int
    """Cells holding tokens, those kept by the prompt cache included."""
    kv_cells_total: int
    kv_cells_cached: int = 0
    """Cells only finished requests hold (the prompt cache; freed when space is needed)."""

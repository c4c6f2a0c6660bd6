"""Embedding models: how one is recognised, the context it gets, and the pure parts of serving it.

**Which models.** A GGUF whose ``{arch}.pooling_type`` (what llama.cpp reads into
``hparams.pooling_type``) is 1 (mean), 2 (cls) or 3 (last) is an embedding model: llama.cpp pools
the final hidden states of each sequence into one vector. That covers encoder models (BERT family)
and decoder models made into embedders (Qwen3-Embedding is qwen3 with pooling "last"). Pooling 4
(rank: rerankers, one score per pair) is refused at load; 0 (none) or no key is a generative model.
Such a runtime serves embeddings only; the generation routes answer it with a 400, as the embedding
routes do on a generative runtime.

**The context** (the planner computes the same): ``embeddings = true`` with the model's pooling
(``LLAMA_POOLING_TYPE_UNSPECIFIED`` picks it), one sequence id per slot (no prompt cache: every
input is computed and its cells are cleared right after), the usual unified pool of
``num_ctx x slots`` cells, and ``n_batch = n_ubatch = num_ctx`` rounded up to a multiple of the slot
count. One micro-batch must hold a whole input: llama.cpp refuses a non-causal model's input split
over micro-batches, and pooling (mean, cls) is computed per micro-batch, so a split input would be
pooled wrongly even by a causal model. The rounding: llama.cpp reserves the graph for a micro-batch
whose token count it rounds up to a multiple of the sequence ids, and with pooled outputs a
micro-batch that is not already such a multiple fails an assertion (measured on the pinned
llama.cpp: ``n_ubatch = 64`` with 3 ids aborts, 66 works).

**A step** packs as many queued inputs as fit (one sequence id each, at most ``n_batch`` tokens in
all) into one ``llama_decode``, in arrival order across requests, so a batch larger than the slot
count takes several decodes and small requests share one.

**The vectors** come back as llama.cpp pools them. The API normalises them where the API does
(Ollama's ``/api/embed`` and OpenAI's ``/v1/embeddings``; Ollama's legacy ``/api/embeddings`` does
not) and shortens them to ``dimensions`` as Ollama does (Matryoshka: the first ``dimensions`` of the
unit vector, renormalised).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..planning.memory import embedding_batch
from .values import EngineConfig, EngineError, PromptTooLongError

__all__ = [
    "POOLING_NAMES",
    "EmbeddingCancelledError",
    "EmbeddingJob",
    "EmbeddingModel",
    "EmbeddingQueue",
    "EmbeddingResult",
    "EmptyInputError",
    "InputTooLongError",
    "UnsupportedPoolingError",
    "embedding_batch_size",
    "embedding_context_params",
    "fit_input",
    "fit_inputs",
    "normalize",
    "read_pooling_type",
    "read_vector",
    "resolve",
    "shorten",
]

Vector = npt.NDArray[np.float32]

POOLING_NAMES = {1: "mean", 2: "cls", 3: "last"}
"""llama.cpp's pooling types an embedding runtime serves."""

RANK_POOLING = 4


class UnsupportedPoolingError(ValueError):
    """The model's pooling type is not one this runtime serves (rank, or one llama.cpp added later)."""


@dataclass(frozen=True)
class EmbeddingModel:
    """What the engine needs to know of a loaded embedding model."""

    pooling: int
    """1 mean, 2 cls, 3 last."""
    n_embd: int
    """Values of a pooled vector (``llama_model_n_embd_out``)."""
    end: int | None
    """The token the tokenizer appends to every input (SEP or EOS), kept last by truncation."""

    @classmethod
    def inspect(cls, lib: Any, model: Any) -> EmbeddingModel | None:
        """The model's embedding traits, or None for a generative model; raises
        :class:`UnsupportedPoolingError` for a pooling this runtime does not serve."""
        pooling = read_pooling_type(lib, model)
        if pooling is None:
            return None
        vocab = lib.llama_model_get_vocab(model)
        end = None
        if lib.llama_vocab_get_add_sep(vocab):
            end = int(lib.llama_vocab_sep(vocab))
        elif lib.llama_vocab_get_add_eos(vocab):
            end = int(lib.llama_vocab_eos(vocab))
        return cls(pooling, int(lib.llama_model_n_embd_out(model)), end)

    def describe(self, config: EngineConfig) -> str:
        return (
            f"embedding model (pooling {POOLING_NAMES[self.pooling]}, {self.n_embd} dimensions): "
            f"embeddings only, up to {config.num_parallel} inputs of up to {config.num_ctx} tokens "
            f"per decode"
        )


def read_pooling_type(lib: Any, model: Any) -> int | None:
    """The embedding pooling of a loaded model (1 mean, 2 cls, 3 last), or None for a generative one.

    Read from the GGUF metadata as llama.cpp reads it (``{general.architecture}.pooling_type``);
    raises :class:`UnsupportedPoolingError` for rank (rerankers) and unknown values."""
    arch = _meta(lib, model, "general.architecture")
    raw = _meta(lib, model, f"{arch}.pooling_type") if arch else None
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UnsupportedPoolingError(f"{arch}.pooling_type is {raw!r}, not a number") from None
    if value == 0:
        return None
    if value in POOLING_NAMES:
        return value
    if value == RANK_POOLING:
        raise UnsupportedPoolingError(
            f"{arch}.pooling_type is 4 (rank): reranking models are not supported, only embedding "
            "models (pooling mean, cls or last) and generative models"
        )
    raise UnsupportedPoolingError(f"{arch}.pooling_type is {value}, which this runtime does not know")


def _meta(lib: Any, model: Any, key: str) -> str | None:
    size = 256
    buf = ctypes.create_string_buffer(size)
    n = int(lib.llama_model_meta_val_str(model, key.encode(), buf, size))
    if n < 0:
        return None
    if n >= size:
        buf = ctypes.create_string_buffer(n + 1)
        lib.llama_model_meta_val_str(model, key.encode(), buf, n + 1)
    return buf.value.decode("utf-8", "replace")


def embedding_batch_size(num_ctx: int, num_parallel: int) -> int:
    """``n_batch`` and ``n_ubatch`` of an embedding context: the memory model's rule
    (:func:`..planning.memory.embedding_batch`), so the runtime creates the context the plan sized."""
    return embedding_batch(num_ctx, num_parallel)


def embedding_context_params(lib: Any, config: EngineConfig, threads: int) -> Any:
    """The context of an embedding runtime: the generation layout (one unified pool of
    ``num_ctx x slots`` cells) with embeddings on, the model's pooling, one sequence id per slot and
    one micro-batch that holds a whole input."""
    from .binding import context_params

    params = context_params(lib, config, config.num_parallel, threads)
    params.embeddings = True
    params.pooling_type = lib.LLAMA_POOLING_TYPE_UNSPECIFIED  # the model's own
    size = embedding_batch_size(config.num_ctx, config.num_parallel)
    params.n_batch = size
    params.n_ubatch = size
    return params


# ---------------------------------------------------------------------------------- inputs


class InputTooLongError(PromptTooLongError):
    """An input is longer than a slot and the request did not ask to truncate."""

    def __init__(self, index: int, length: int, limit: int) -> None:
        super().__init__(
            f"input {index} is {length} tokens but the context of a slot holds {limit} (num_ctx)"
        )
        self.index = index
        self.length = length
        self.limit = limit


class EmbeddingCancelledError(EngineError):
    """The server stopped before the request's inputs were all computed."""


class EmptyInputError(EngineError):
    """An input has no tokens (an empty string for a model that adds no BOS token)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"input {index} is empty")
        self.index = index


def fit_input(tokens: Sequence[int], limit: int, *, truncate: bool, end: int | None = None) -> list[int]:
    """``tokens`` if they fit one slot of ``limit`` tokens, else their first ``limit`` when
    truncating (Ollama keeps the beginning of an embedding input). ``end``: the token the tokenizer
    appends (EOS or SEP, when the vocabulary adds one); it stays the last token, as Ollama's
    truncation gets by re-tokenizing the shortened text, since "last" pooling reads that token.
    Raises ValueError when it does not fit and ``truncate`` is off (the caller says which input)."""
    if len(tokens) <= limit:
        return list(tokens)
    if not truncate:
        raise ValueError(f"{len(tokens)} tokens do not fit {limit}")
    if end is not None and tokens[-1] == end and limit > 1:
        return [*tokens[: limit - 1], end]
    return list(tokens[:limit])


def fit_inputs(
    inputs: Sequence[Sequence[int]], limit: int, *, truncate: bool, end: int | None = None
) -> tuple[list[list[int]], bool]:
    """Every input fitted to a slot (:func:`fit_input`), and whether any was truncated; raises
    :class:`EmptyInputError` or :class:`InputTooLongError` naming the input's index."""
    fitted: list[list[int]] = []
    for index, tokens in enumerate(inputs):
        if not tokens:
            raise EmptyInputError(index)
        try:
            fitted.append(fit_input(tokens, limit, truncate=truncate, end=end))
        except ValueError:
            raise InputTooLongError(index, len(tokens), limit) from None
    return fitted, any(len(a) != len(b) for a, b in zip(fitted, inputs, strict=True))


# ---------------------------------------------------------------------------------- vectors


def normalize(vector: Vector) -> Vector:
    """The unit vector along ``vector`` (Ollama's and llama-server's L2 normalisation; a zero vector
    stays zero). Raises ValueError on NaN or infinite values, as Ollama does."""
    values = np.asarray(vector, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError("embedding contains NaN or Inf values")
    norm = float(np.sqrt(np.dot(values.astype(np.float64), values.astype(np.float64))))
    return (values / max(norm, 1e-12)).astype(np.float32)


def shorten(vector: Vector, dimensions: int | None) -> Vector:
    """Matryoshka truncation as Ollama does it: the first ``dimensions`` values of the (unit)
    vector, renormalised; None or at least the vector's length leaves it as it is."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    return normalize(vector[:dimensions])


# ---------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class EmbeddingResult:
    """The pooled vectors of one request's inputs (as llama.cpp computed them, not normalised)."""

    vectors: list[Vector]
    prompt_tokens: int
    """Tokens computed, over all inputs (after truncation)."""
    truncated: bool
    """Whether any input was truncated."""
    queue_seconds: float
    """From submission until its first input was decoded."""
    total_seconds: float


class EmbeddingJob:
    """One request's inputs on their way through the scheduler thread; the asyncio side awaits
    ``future``, which is resolved on its own loop."""

    def __init__(
        self, inputs: list[list[int]], loop: asyncio.AbstractEventLoop, *, truncated: bool = False
    ) -> None:
        self.inputs = inputs
        self.loop = loop
        self.future: asyncio.Future[EmbeddingResult] = loop.create_future()
        self.truncated = truncated
        self.vectors: list[Vector | None] = [None] * len(inputs)
        self.taken = 0
        """Inputs handed to a decode so far (they are taken in order)."""
        self.done_count = 0
        self.submitted_at = time.perf_counter()
        self.started_at = 0.0
        self.cancelled = False
        self.future.add_done_callback(self._on_done)

    def _on_done(self, future: asyncio.Future[EmbeddingResult]) -> None:
        if future.cancelled():  # the client went away: the rest of its inputs are not computed
            self.cancelled = True

    @property
    def started(self) -> bool:
        return self.taken > 0

    @property
    def finished(self) -> bool:
        return self.done_count == len(self.inputs)

    def store(self, index: int, vector: Vector) -> None:
        self.vectors[index] = vector
        self.done_count += 1

    def result(self) -> EmbeddingResult:
        vectors = [v for v in self.vectors if v is not None]
        return EmbeddingResult(
            vectors=vectors,
            prompt_tokens=sum(len(tokens) for tokens in self.inputs),
            truncated=self.truncated,
            queue_seconds=(self.started_at or self.submitted_at) - self.submitted_at,
            total_seconds=time.perf_counter() - self.submitted_at,
        )


class EmbeddingQueue:
    """The jobs waiting for or in the middle of their decodes, in arrival order. Only the
    scheduler thread takes from it; the engine guards it with its lock."""

    def __init__(self) -> None:
        self._jobs: collections.deque[EmbeddingJob] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: EmbeddingJob) -> None:
        self._jobs.append(job)

    def waiting(self) -> int:
        """Jobs none of whose inputs has been decoded yet."""
        return sum(1 for job in self._jobs if not job.started)

    def take(self, max_sequences: int, max_tokens: int) -> list[tuple[EmbeddingJob, int]]:
        """The next inputs for one decode, as (job, input index): in arrival order, one sequence
        id each, as many as fit ``max_sequences`` and ``max_tokens``. The first always fits (no
        input is longer than a slot, nor a slot than the batch). Cancelled jobs are dropped."""
        picks: list[tuple[EmbeddingJob, int]] = []
        tokens = 0
        for job in [j for j in self._jobs if j.cancelled]:
            self._jobs.remove(job)
        for job in self._jobs:
            while job.taken < len(job.inputs) and len(picks) < max_sequences:
                size = len(job.inputs[job.taken])
                if picks and tokens + size > max_tokens:
                    return picks
                picks.append((job, job.taken))
                tokens += size
                job.taken += 1
            if len(picks) >= max_sequences:
                break
        return picks

    def remove(self, job: EmbeddingJob) -> None:
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)

    def drain(self) -> list[EmbeddingJob]:
        """Every job, removed from the queue (to fail them all)."""
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs


def resolve(outcomes: Iterable[tuple[EmbeddingJob, EmbeddingResult | BaseException]]) -> None:
    """Hand results (or errors) to their jobs' loops: one thread-safe call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[EmbeddingJob, EmbeddingResult | BaseException]]] = {}
    for item in outcomes:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(_settle_all, items)


def _settle_all(items: list[tuple[EmbeddingJob, EmbeddingResult | BaseException]]) -> None:
    for job, outcome in items:
        if job.future.done():
            continue
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


def read_vector(lib: Any, ctx: Any, seq_id: int, n_embd: int) -> Vector:
    """A copy of the pooled embedding of ``seq_id`` after a decode (llama.cpp reuses the buffer)."""
    pointer = lib.llama_get_embeddings_seq(ctx, seq_id)
    if not pointer:
        raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
    return np.ctypeslib.as_array(pointer, shape=(n_embd,)).astype(np.float32, copy=True)

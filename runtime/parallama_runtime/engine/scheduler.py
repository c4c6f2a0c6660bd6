"""The engine: one llama.cpp model and context, N slots over one KV pool, one scheduler thread.

Why this shape:

* One context with a unified KV pool of ``num_ctx x slots`` cells (see :mod:`.binding`): every busy
  request decodes in the same micro-batch whatever its sequence id, and cells can be shared.
* A single scheduler thread owns the context. Each step packs the next token of every generating
  request plus prompt chunks of the requests still prefilling into ONE ``llama_batch`` and calls
  ``llama_decode`` once, so the matrix products are shared by all slots.
* Prefill is fair and bounded: prompt chunks go round-robin over the prefilling requests, and while
  anyone is generating a step takes at most ``prefill_budget`` prompt tokens, so a long prompt
  arriving costs the running streams a bounded inter-token latency instead of a long stall.
* The prompt cache (:mod:`.prompt_cache`) keeps finished requests' cells and starts a new request
  on the sequence sharing its longest prefix; only the rest of the prompt is computed.
* Results cross to asyncio with one ``call_soon_threadsafe`` per step and loop (not per token).

The engine knows asyncio (it hands out :class:`RequestHandle` objects that are async iterators) but
nothing about HTTP: errors are exceptions the API maps to status codes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..termination import Failure, FailureReason, allocation_failure_line
from .binding import Batch, LlamaMemory, Vocab, context_params, model_params, sequence_ids
from .cpu import available_cpus
from .embedding import (
    EmbeddingCancelledError,
    EmbeddingJob,
    EmbeddingModel,
    EmbeddingQueue,
    EmbeddingResult,
    UnsupportedPoolingError,
    embedding_context_params,
    fit_inputs,
    read_vector,
    resolve,
)
from .grammar import Candidates, GrammarSampler
from .llama_log import LlamaLogCapture, ParsedReports, parse_buffer_reports
from .logprobs import token_logprob
from .prompt_cache import PromptCache
from .requests import Request, RequestHandle, deliver
from .sampling import make_sampler
from .values import (
    EngineConfig,
    EngineError,
    EngineLoadError,
    EngineObserver,
    EngineStats,
    Event,
    Finish,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    TextChunk,
    TokenLogprob,
)

__all__ = ["Engine"]

log = logging.getLogger(__name__)

ALLOC_FAILED = -2
"""``llama_decode``'s answer for ``GGML_STATUS_ALLOC_FAILED`` (llama-context.cpp): the compute
buffers could not be allocated. 1 (no KV slot), 2 (aborted), -1 (bad batch) and -3 (compute failed)
are not allocation failures."""

Outbox = list[tuple[Request, Event]]

NO_GRAMMAR_TOKEN = (
    "no token the grammar allows is left under these sampling settings (logit_bias, penalties, temperature)"
)
"""Why a grammar-constrained request ended early (see :mod:`.grammar`): only absurd settings get here."""


@contextlib.contextmanager
def _freed_on_error(grammar: GrammarSampler | None) -> Iterator[None]:
    """Free a parsed grammar if the request holding it is not queued after all."""
    try:
        yield
    except BaseException:
        if grammar is not None:
            grammar.free()
        raise


class Engine:
    """Owns llama.cpp. :meth:`load` then :meth:`start`; :meth:`submit` from an asyncio loop."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None) -> None:
        if config.num_parallel < 1 or config.num_ctx < 1:
            raise ValueError("num_parallel and num_ctx must be positive")
        if config.prefill_budget < 1:
            raise ValueError("prefill_budget must be positive")
        self.config = config
        self.observer = observer
        self._lib: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self.vocab: Vocab | None = None
        self.memory: LlamaMemory | None = None
        self.cache: PromptCache | None = None
        self._batch: Batch | None = None
        self._split: Any = None
        self._active: list[Request] = []
        self._pending: collections.deque[Request] = collections.deque()
        self._cancels: list[Request] = []
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        """Held while the scheduler uses llama.cpp; :meth:`audit` takes it to read a still cache."""
        self._thread: threading.Thread | None = None
        self._thread_exit = False
        self._stopping = False
        self._ids = 0
        self._cursor = 0
        self._busy_max = 0
        self._queue_max = 0
        self._cells_used = 0
        self._cells_cached = 0
        self.loaded = False
        self.failed = False
        self.fatal: Failure | None = None
        """Set when the engine ran out of memory while serving: the process should exit."""
        self.on_fatal: Callable[[Failure], None] | None = None
        """Called once with that failure, on the scheduler or logging thread (serve writes the
        termination message and stops the server)."""
        self._capture: LlamaLogCapture | None = None
        self.reports = ParsedReports()
        self.n_vocab = 0
        self.bos_token_id = -1
        self.eos_token_id = -1
        self.bos_text = ""
        self.eos_text = ""
        self.chat_template: str | None = None
        self.model_description = ""
        self.n_params = 0
        self.max_token_bytes = 0
        """Input bytes one token can stand for at most (0: unknown); see :class:`.binding.Vocab`."""
        self.n_seq_max = config.num_parallel
        self.kv_cells_total = config.num_ctx * config.num_parallel
        self.threads = 0
        self._candidates: Candidates | None = None
        """The vocabulary-wide buffer grammar-constrained draws use (made at the first one)."""
        self.embedding_model = False
        """The model's GGUF sets a pooling type: it serves embeddings only (see :mod:`.embedding`)."""
        self.pooling_type = 0
        self.n_embd = 0
        self._embeddings = EmbeddingQueue()
        self._embedding: EmbeddingModel | None = None

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the model and create the context; blocking (call it off the event loop)."""
        import llama_cpp as lib

        self._lib = lib
        capture = LlamaLogCapture.install()
        mark = capture.mark()
        lib.llama_backend_init()
        cfg = self.config
        mparams, self._split = model_params(lib, cfg)
        model = lib.llama_model_load_from_file(cfg.model_path.encode(), mparams)
        if not model:
            raise EngineLoadError(self._load_failure(capture.since(mark), "model"))
        self._model = model
        self._detect_embeddings(lib, model)
        recurrent = bool(lib.llama_model_is_recurrent(model) or lib.llama_model_is_hybrid(model))
        self.n_seq_max = sequence_ids(
            cfg, recurrent=recurrent, sliding_window=int(lib.llama_model_n_swa(model))
        )
        self.threads = cfg.threads or available_cpus()  # the container's quota, not the host's cores
        if self.embedding_model:
            self.n_seq_max = cfg.num_parallel
            params = embedding_context_params(lib, cfg, self.threads)
        else:
            params = context_params(lib, cfg, self.n_seq_max, self.threads)
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            self._model = None
            raise EngineLoadError(self._load_failure(capture.since(mark), "context"))
        self._ctx = ctx
        self.reports = parse_buffer_reports(capture.since(mark))
        vocab = Vocab(lib, lib.llama_model_get_vocab(model))
        self.vocab = vocab
        self.memory = LlamaMemory(lib, lib.llama_get_memory(ctx))
        self.kv_cells_total = int(lib.llama_n_ctx(ctx))  # num_ctx x slots, padded to 256
        self.cache = PromptCache(
            self.memory, self.n_seq_max, self.kv_cells_total, share=not recurrent, keep=cfg.prompt_cache
        )
        self.n_vocab = vocab.n_tokens
        self.max_token_bytes = vocab.max_token_bytes
        self.bos_token_id = vocab.bos
        self.eos_token_id = vocab.eos
        # an encoder's vocabulary (BERT: CLS and SEP) may have no BOS or EOS: llama.cpp aborts on -1
        bos = vocab.piece(vocab.bos, special=True) if vocab.bos >= 0 else b""
        eos = vocab.piece(vocab.eos, special=True) if vocab.eos >= 0 else b""
        self.bos_text = bos.decode("utf-8", "replace")
        self.eos_text = eos.decode("utf-8", "replace")
        template = lib.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8", "replace") if template else None
        self.n_params = int(lib.llama_model_n_params(model))
        desc = ctypes.create_string_buffer(256)
        lib.llama_model_desc(model, desc, 256)
        self.model_description = desc.value.decode("utf-8", "replace")
        self._batch = Batch(lib, int(params.n_batch))
        self.loaded = True
        self._capture = capture
        capture.watch(self._on_log_line)
        mem = cfg.memory_config
        log.info(
            "context ready: %d slots x %d tokens in one pool of %d cells, %d sequence ids, KV %s/%s, "
            "flash attention %s, %d threads, prompt cache %s",
            cfg.num_parallel,
            cfg.num_ctx,
            self.kv_cells_total,
            self.n_seq_max,
            mem.type_k,
            mem.type_v,
            "on" if cfg.flash_attention else "off",
            self.threads,
            "on" if cfg.prompt_cache else "off",
        )

    def _detect_embeddings(self, lib: Any, model: Any) -> None:
        """Embedding mode from the model's metadata; a pooling this runtime cannot serve (rank) is
        a load failure that says so."""
        cfg = self.config
        try:
            self._embedding = EmbeddingModel.inspect(lib, model)
        except UnsupportedPoolingError as error:
            lib.llama_model_free(model)
            self._model = None
            failure = Failure(FailureReason.UNSUPPORTED_MODEL, str(error), cfg.num_parallel, cfg.num_ctx)
            raise EngineLoadError(failure) from None
        self.embedding_model = self._embedding is not None
        self.pooling_type = self._embedding.pooling if self._embedding else 0
        self.n_embd = int(lib.llama_model_n_embd_out(model))
        if self._embedding is not None:
            log.info("%s", self._embedding.describe(cfg))

    def _load_failure(self, lines: list[str], stage: str) -> Failure:
        """Why llama.cpp refused: an allocation it logged (the plan's memory), an architecture it
        does not know, or (loading the model) a file it cannot read."""
        cfg = self.config
        allocation = allocation_failure_line(lines)
        errors = [line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower()]
        detail = errors[-1] if errors else f"llama.cpp could not create the {stage}"
        if allocation is not None:
            reason = FailureReason.GPU_OOM_LOAD
            detail = allocation
        elif any("unknown model architecture" in line for line in lines):
            reason = FailureReason.UNSUPPORTED_MODEL
        elif stage == "model":
            reason = FailureReason.UNREADABLE_FILE
            detail = f"llama.cpp could not load {cfg.model_path}: {detail}"
        else:
            reason = FailureReason.LOAD_FAILED
        return Failure(reason, detail, slots=cfg.num_parallel, num_ctx=cfg.num_ctx)

    def _on_log_line(self, line: str) -> None:
        """While serving, a CUDA out-of-memory is often fatal inside llama.cpp (ggml aborts the
        process right after logging it), so the failure is reported as soon as it is logged."""
        if self.loaded and self.fatal is None and allocation_failure_line([line]) is not None:
            self._report_fatal(line)

    def _report_fatal(self, detail: str) -> None:
        if self.fatal is not None:
            return
        cfg = self.config
        self.fatal = Failure(FailureReason.GPU_OOM_SERVING, detail, cfg.num_parallel, cfg.num_ctx)
        log.error("out of memory while serving: %s", detail)
        if self.on_fatal is not None:
            self.on_fatal(self.fatal)

    def _decode(self, ctx: Any, batch: Any) -> int:
        """One ``llama_decode`` (a seam: tests replace it to inject llama.cpp's failure codes)."""
        return int(self._lib.llama_decode(ctx, batch))

    # ------------------------------------------------------------------ text

    def _vocab(self) -> Vocab:
        if self.vocab is None:
            raise EngineError("model is not loaded yet")
        return self.vocab

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Safe from any thread (the vocabulary is read-only)."""
        return self._vocab().tokenize(text, add_special=add_special, parse_special=parse_special)

    # ------------------------------------------------------------------ API side

    def start(self) -> None:
        if not self.loaded:
            raise EngineError("load() the model before start()")
        self._thread = threading.Thread(target=self._run, name="parallama-scheduler", daemon=True)
        self._thread.start()

    def scheduler_alive(self) -> bool:
        """False once the scheduler thread has died (or never started): the process cannot serve."""
        return self._thread is not None and self._thread.is_alive() and not self.failed

    def submit(
        self, prompt: Sequence[int], params: SamplingParams, *, truncate: bool = False
    ) -> RequestHandle:
        """Queue a tokenized prompt; must be called from the asyncio loop that will read events."""
        if not self.loaded or self._thread is None:
            raise EngineError("model is not loaded yet")
        if self.failed:
            raise EngineError("the scheduler failed; see the server log")
        if self.embedding_model:
            raise EngineError("this model does not support generate")
        tokens = self._fit_prompt(list(prompt), params, truncate=truncate)
        was_truncated = len(tokens) != len(prompt) and len(prompt) > 0
        loop = asyncio.get_running_loop()
        grammar = self._grammar(params.grammar) if params.grammar is not None else None
        with self._cond, _freed_on_error(grammar):
            if self._stopping:
                raise EngineError("server is shutting down")
            free = self.config.num_parallel - len(self._active)
            if len(self._pending) >= self.config.max_queue + max(free, 0):
                raise QueueFullError(
                    f"all {self.config.num_parallel} slots are busy and {len(self._pending)} requests are "
                    f"waiting (max queue {self.config.max_queue})"
                )
            self._ids += 1
            request = Request(self._ids, tokens, params, loop)
            request.grammar = grammar
            self._pending.append(request)
            self._queue_max = max(self._queue_max, len(self._pending))
            self._cond.notify()
        handle = RequestHandle(request, self._cancel)
        handle.truncated = was_truncated
        return handle

    def _grammar(self, text: str) -> GrammarSampler:
        """The request's grammar, parsed now so that a bad one is refused before it is queued
        (:class:`GrammarError`), with what llama.cpp logged about it."""
        capture = self._capture
        mark = capture.mark() if capture is not None else 0

        def why() -> str:
            lines = capture.since(mark) if capture is not None else []
            return "; ".join(line.strip() for line in lines if "grammar" in line)

        return GrammarSampler.create(self._lib, self._vocab().handle, text, why=why)

    def submit_embeddings(
        self, inputs: Sequence[Sequence[int]], *, truncate: bool
    ) -> asyncio.Future[EmbeddingResult]:
        """Queue tokenized inputs for their pooled embeddings; must be called from the asyncio loop
        that awaits the future (cancelling it drops the inputs not computed yet). An input longer
        than a slot is truncated to its first ``num_ctx`` tokens when asked, else refused."""
        if not self.loaded or self._thread is None:
            raise EngineError("model is not loaded yet")
        if self.failed:
            raise EngineError("the scheduler failed; see the server log")
        if self._embedding is None:
            raise EngineError("this model does not support embeddings")
        fitted, truncated = fit_inputs(
            inputs, self.config.num_ctx, truncate=truncate, end=self._embedding.end
        )
        job = EmbeddingJob(fitted, asyncio.get_running_loop(), truncated=truncated)
        if not fitted:
            job.future.set_result(job.result())
            return job.future
        with self._cond:
            if self._stopping:
                raise EngineError("server is shutting down")
            slots = self.config.num_parallel
            if len(self._embeddings) >= slots + self.config.max_queue:
                raise QueueFullError(
                    f"all {slots} slots are busy and {len(self._embeddings) - slots} requests are "
                    f"waiting (max queue {self.config.max_queue})"
                )
            self._embeddings.add(job)
            self._busy_max = max(self._busy_max, min(len(self._embeddings), slots))
            self._queue_max = max(self._queue_max, len(self._embeddings) - slots)
            self._cond.notify()
        return job.future

    def _fit_prompt(self, tokens: list[int], params: SamplingParams, *, truncate: bool) -> list[int]:
        """A request holds at most ``num_ctx`` cells, prompt and answer together."""
        num_ctx = self.config.num_ctx
        if not tokens:
            tokens = [self.bos_token_id] if self.bos_token_id >= 0 else []
        if not tokens:
            raise EngineError("empty prompt")
        if len(tokens) < num_ctx:
            return tokens
        if not truncate:
            raise PromptTooLongError(
                f"prompt is {len(tokens)} tokens but the context of a slot holds {num_ctx} "
                f"(num_ctx); shorten it or ask to truncate"
            )
        keep = num_ctx - max(1, min(params.max_tokens, num_ctx // 4))
        head = [tokens[0]] if tokens[0] == self.bos_token_id else []
        return head + tokens[len(tokens) - (keep - len(head)) :]

    def _cancel(self, request: Request) -> None:
        with self._cond:
            if request.done or request.cancelled:
                return
            request.cancelled = True
            self._cancels.append(request)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            # an embedding request holds a slot from arrival to its last input, like a generation
            jobs = len(self._embeddings)
            slots = self.config.num_parallel
            return EngineStats(
                slots_total=slots,
                slots_busy=len(self._active) + min(jobs, slots),
                slots_busy_max=self._busy_max,
                queue_depth=len(self._pending) + max(jobs - slots, 0),
                queue_depth_max=self._queue_max,
                kv_cells_used=self._cells_used,
                kv_cells_total=self.kv_cells_total,
                kv_cells_cached=self._cells_cached,
            )

    def reset_peaks(self) -> None:
        """Start a new observation window for the high-water marks (slots busy, queue depth)."""
        with self._cond:
            jobs, slots = len(self._embeddings), self.config.num_parallel
            self._busy_max = len(self._active) + min(jobs, slots)
            self._queue_max = len(self._pending) + max(jobs - slots, 0)

    def in_flight(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._active) + len(self._embeddings)

    def audit(self) -> list[str]:
        """Differences between the prompt cache's books and llama.cpp's cache, per sequence id
        (an empty list when they agree). For tests and debugging; waits for the current step."""
        if self.cache is None or self.memory is None:
            return []
        with self._step_lock:
            problems = []
            for sequence in self.cache.sequences:
                # the last position must agree; the first is 0 in an attention cache, the state's
                # own position in recurrent memory, past the window in a sliding-window cache
                last = self.memory.seq_pos_max(sequence.id)
                first = self.memory.seq_pos_min(sequence.id)
                expected = len(sequence.tokens) - 1
                if last != expected or (first < 0) != (expected < 0) or first > max(last, 0):
                    problems.append(
                        f"sequence {sequence.id}: llama.cpp holds {first}..{last}, books 0..{expected}"
                    )
            return problems

    def stop_admitting(self) -> None:
        with self._cond:
            self._stopping = True

    def cancel_all(self) -> None:
        with self._cond:
            for request in list(self._pending) + self._active:
                if not request.cancelled and not request.done:
                    request.cancelled = True
                    self._cancels.append(request)
            jobs = self._embeddings.drain()
            self._cond.notify()
        resolve((job, EmbeddingCancelledError("request cancelled: server is shutting down")) for job in jobs)

    def close(self) -> None:
        """Stop the scheduler (cancelling what remains) and free llama.cpp's objects."""
        self.stop_admitting()
        self.cancel_all()
        if self._capture is not None:
            self._capture.unwatch(self._on_log_line)
            self._capture = None
        with self._cond:
            self._thread_exit = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        lib = self._lib
        if lib is None:
            return
        for request in self._active:
            if request.sampler is not None:
                lib.llama_sampler_free(request.sampler)
                request.sampler = None
            if request.grammar is not None:
                request.grammar.free()
                request.grammar = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None
        self.loaded = False

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException:  # a bug here must not leave clients hanging forever
            log.exception("scheduler crashed")
            self.failed = True  # /healthz fails: Kubernetes restarts the pod
            with contextlib.suppress(Exception):
                self._fail_everything("internal error in the scheduler")

    def _fail_everything(self, message: str) -> None:
        with self._cond:
            self._stopping = True
            requests = list(self._pending) + self._active
            self._pending.clear()
            jobs = self._embeddings.drain()
        resolve((job, EngineError(message)) for job in jobs)
        for request in list(self._active):
            self._release(request, keep=False)
        deliver([(request, self._finish_event(request, "error", error=message)) for request in requests])

    def _step(self) -> bool:
        """One scheduling step: take cancellations and new requests, decode one batch, sample.
        False when the thread should exit."""
        with self._cond:
            while not (
                self._thread_exit
                or self._cancels
                or self._active
                or (self._pending and len(self._active) < self.config.num_parallel)
                or self._embeddings
            ):
                self._cond.wait()
            if self._thread_exit and not self._active and not self._pending and not self._embeddings:
                return False
            cancels, self._cancels = self._cancels, []
            for request in cancels:
                with contextlib.suppress(ValueError):
                    self._pending.remove(request)
            admitted: list[Request] = []
            while self._pending and len(self._active) + len(admitted) < self.config.num_parallel:
                admitted.append(self._pending.popleft())
        outbox: Outbox = []
        with self._step_lock:
            for request in cancels:
                if not request.done:
                    self._release(request, keep=True)
                    outbox.append((request, self._finish_event(request, "cancelled")))
            now = time.perf_counter()
            for request in admitted:
                self._admit(request, now)
            with self._cond:
                self._active.extend(admitted)
                self._busy_max = max(self._busy_max, len(self._active))
            if self._active:
                self._decode_step(outbox)
            if self._embeddings:
                self._embed_step()
            self._publish_cells()
        deliver(outbox)
        return True

    def _embed_step(self) -> None:
        """One ``llama_decode`` over the next embedding inputs (one sequence id each, see
        :meth:`.EmbeddingQueue.take`); their pooled vectors are read and their cells cleared."""
        assert self._batch is not None and self.memory is not None
        with self._cond:
            picks = self._embeddings.take(self.n_seq_max, len(self._batch.tokens))
        if not picks:
            return
        tokens: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        now = time.perf_counter()
        for seq_id, (job, index) in enumerate(picks):
            ids = job.inputs[index]
            tokens.extend(ids)
            positions.extend(range(len(ids)))
            seq_ids.extend([seq_id] * len(ids))
            job.started_at = job.started_at or now
            if self.observer is not None:
                self.observer.on_admitted(now - job.submitted_at, len(ids), 0)
        self._batch.fill(tokens, positions, seq_ids, [1] * len(tokens))  # pooling reads every token
        rc = self._decode(self._ctx, self._batch.handle)
        failed: list[tuple[EmbeddingJob, EmbeddingResult | BaseException]] = []
        if rc == 0:
            for seq_id, (job, index) in enumerate(picks):
                job.store(index, read_vector(self._lib, self._ctx, seq_id, self.n_embd))
        for seq_id in range(len(picks)):
            self.memory.seq_rm(seq_id, -1, -1)
        if rc != 0:
            log.error("llama_decode failed with %d for %d embedding inputs", rc, len(picks))
            tail = self._capture.tail(20) if self._capture is not None else []
            allocation = allocation_failure_line(tail) if rc < 0 else None
            if rc == ALLOC_FAILED or allocation is not None or self.fatal is not None:
                self._report_fatal(allocation or f"llama_decode failed ({rc}): could not allocate")
                self.failed = True
                self._fail_everything(f"out of memory while serving (llama_decode {rc})")
                return
            failed = [(job, EngineError(f"llama_decode failed ({rc})")) for job in {j for j, _ in picks}]
        finished = [job for job in dict.fromkeys(j for j, _ in picks) if job.finished]
        with self._cond:
            for job, _ in failed:
                self._embeddings.remove(job)
            for job in finished:
                self._embeddings.remove(job)
        resolve([*failed, *((job, job.result()) for job in finished)])

    def _admit(self, request: Request, now: float) -> None:
        assert self.cache is not None and self.vocab is not None
        request.started_at = now
        placement = self.cache.acquire(request.prompt)
        request.seq_id = placement.seq_id
        request.cached = request.fed = request.n_past = placement.reused
        request.sampler = make_sampler(self._lib, request.params, self.n_vocab, request.prompt)
        if self.observer is not None:
            self.observer.on_admitted(now - request.submitted_at, len(request.prompt), placement.reused)

    def _plan_batch(self) -> tuple[list[Request], list[tuple[Request, int]]]:
        """Who goes into this step: every generating request (one token each), then prompt chunks
        round-robin over the prefilling ones within the step's prefill budget."""
        cfg = self.config
        generating = [r for r in self._active if not r.prefilling]
        prefilling = [r for r in self._active if r.prefilling]
        budget = cfg.n_batch - len(generating)
        if generating:
            budget = min(budget, cfg.prefill_budget)
        chunks: list[tuple[Request, int]] = []
        if prefilling and budget > 0:
            start = self._cursor % len(prefilling)
            order = prefilling[start:] + prefilling[:start]
            self._cursor += 1
            share = max(1, -(-budget // len(order)))
            taken = {id(r): 0 for r in order}
            for _ in range(2):  # a fair share each, then what is left in turn
                for request in order:
                    want = len(request.prompt) - request.fed - taken[id(request)]
                    take = min(want, share, budget)
                    if take > 0:
                        taken[id(request)] += take
                        budget -= take
                share = budget
            chunks = [(r, taken[id(r)]) for r in order if taken[id(r)]]
        return generating, chunks

    def _decode_step(self, outbox: Outbox) -> None:
        assert self.cache is not None and self._batch is not None
        generating, chunks = self._plan_batch()
        tokens: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        logits: list[int] = []
        for request in generating:
            request.logit_index = len(tokens)
            tokens.append(request.next_token)
            positions.append(request.n_past)
            seq_ids.append(request.seq_id)
            logits.append(1)
        for request, take in chunks:
            start = request.fed
            tokens.extend(request.prompt[start : start + take])
            positions.extend(range(request.n_past, request.n_past + take))
            seq_ids.extend([request.seq_id] * take)
            logits.extend([0] * take)
            finishes_prompt = start + take == len(request.prompt)
            if finishes_prompt:
                logits[-1] = 1
            request.logit_index = len(tokens) - 1 if finishes_prompt else -1
        if not tokens:
            return
        if not self.cache.reserve(len(tokens)):
            self._fail_batch(generating, chunks, outbox, "the KV pool has no free cells for this step")
            return
        self._batch.fill(tokens, positions, seq_ids, logits)
        rc = self._decode(self._ctx, self._batch.handle)
        if rc != 0:
            self._on_decode_failure(rc, len(tokens), generating, chunks, outbox)
            return
        for request in generating:
            self.cache.extend(request.seq_id, (request.next_token,))
            request.n_past += 1
        for request, take in chunks:
            self.cache.extend(request.seq_id, request.prompt[request.fed : request.fed + take])
            request.fed += take
            request.n_past += take
        now = time.perf_counter()
        for request in generating + [r for r, _ in chunks]:
            if request.logit_index >= 0 and not request.done:
                token = self._sample(request, outbox)
                if token is not None:
                    self._on_token(request, token, now, outbox)

    def _sample(self, request: Request, outbox: Outbox) -> int | None:
        """The request's next token, through its grammar if it has one; None when the grammar left
        no token (the request is then ended with an error)."""
        if request.grammar is None:
            return int(self._lib.llama_sampler_sample(request.sampler, self._ctx, request.logit_index))
        if self._candidates is None:
            self._candidates = Candidates(self._lib, self.n_vocab)
        assert self.vocab is not None
        token = request.grammar.sample(
            request.sampler, self._ctx, request.logit_index, self._candidates, self.vocab.piece
        )
        if token is None:
            self._release(request, keep=True)
            outbox.append((request, self._finish_event(request, "error", error=NO_GRAMMAR_TOKEN)))
        return token

    def _on_decode_failure(
        self,
        rc: int,
        n_tokens: int,
        generating: list[Request],
        chunks: list[tuple[Request, int]],
        outbox: Outbox,
    ) -> None:
        log.error("llama_decode failed with %d for a batch of %d tokens", rc, n_tokens)
        tail = self._capture.tail(20) if self._capture is not None else []
        allocation = allocation_failure_line(tail) if rc < 0 else None
        if rc == ALLOC_FAILED or allocation is not None or self.fatal is not None:
            # out of memory: this context cannot serve its planned slots; exit and say so
            self._report_fatal(allocation or f"llama_decode failed ({rc}): could not allocate")
            self.failed = True
            deliver(outbox)
            outbox.clear()
            self._fail_everything(f"out of memory while serving (llama_decode {rc})")
            return
        self._fail_batch(generating, chunks, outbox, f"llama_decode failed ({rc})")

    def _fail_batch(
        self, generating: list[Request], chunks: list[tuple[Request, int]], outbox: Outbox, message: str
    ) -> None:
        """End the requests of a batch llama.cpp did not take; their cells may be partial, so their
        sequences are cleared rather than cached."""
        for request in generating + [r for r, _ in chunks]:
            if not request.done:
                self._release(request, keep=False)
                outbox.append((request, self._finish_event(request, "error", error=message)))

    def _on_token(self, request: Request, token: int, now: float, outbox: Outbox) -> None:
        assert self.vocab is not None
        request.generated += 1
        if request.generated == 1:
            request.first_at = now
            if self.observer is not None:
                self.observer.on_first_token(now - request.submitted_at)
        else:
            request.gaps.append(now - request.last_at)
        request.last_at = now
        params = request.params
        # under a grammar an end-of-generation token means the grammar's text is complete
        ignore_eos = params.ignore_eos and request.grammar is None
        if not ignore_eos and self.vocab.is_end_of_generation(token):
            request.generated -= 1  # the end-of-generation token is not part of the answer
            self._complete(request, "stop", outbox)
            return
        queue = request.logprobs
        pending = request.decoder.getstate()[0] if queue is not None else b""
        decoded = request.decoder.decode(self.vocab.piece(token))
        if queue is not None:  # only requests that ask pay for a pass over the logits
            queue.add(self._logprob(request, token, pending), decoded)
        text, stopped = request.stops.feed(decoded)
        if stopped:
            entries = queue.stopped(text) if queue is not None else ()
            if text or entries:
                outbox.append((request, TextChunk(text, entries)))
            self._complete(request, "stop", outbox, flush=False)
            return
        # even empty: one chunk per token keeps TTFT honest
        outbox.append((request, TextChunk(text, queue.sent(text) if queue is not None else ())))
        if request.generated >= params.max_tokens or request.n_past >= self.config.num_ctx:
            self._complete(request, "length", outbox)
            return
        request.next_token = token

    def _logprob(self, request: Request, token: int, pending: bytes) -> TokenLogprob:
        """The chosen token's entry from the row of logits it was sampled from (see :mod:`.logprobs`)."""
        assert self.vocab is not None
        logits = self._lib.llama_get_logits_ith(self._ctx, request.logit_index)
        top = request.params.logprobs or 0
        return token_logprob(logits, self.n_vocab, token, top, self.vocab.piece, pending)

    def _complete(self, request: Request, reason: str, outbox: Outbox, *, flush: bool = True) -> None:
        """End a request; unless a stop sequence ended it, text held back for a possible stop (and
        an incomplete UTF-8 tail) is part of the answer and goes out first."""
        if flush:
            tail = request.stops.flush() + request.decoder.decode(b"", final=True)
            entries = request.logprobs.rest() if request.logprobs is not None else ()
            if tail or entries:
                outbox.append((request, TextChunk(tail, entries)))
        self._release(request, keep=True)
        outbox.append((request, self._finish_event(request, reason)))

    def _release(self, request: Request, *, keep: bool) -> None:
        """Free a request's slot; its cells stay in the prompt cache if ``keep``."""
        if request.sampler is not None:
            self._lib.llama_sampler_free(request.sampler)
            request.sampler = None
        if request.grammar is not None:
            request.grammar.free()
            request.grammar = None
        if request.seq_id >= 0 and self.cache is not None:
            self.cache.release(request.seq_id, keep=keep)
            request.seq_id = -1
        with self._cond:
            with contextlib.suppress(ValueError):
                self._active.remove(request)
            request.done = True

    def _publish_cells(self) -> None:
        if self.cache is not None:
            self._cells_used = self.cache.live_cells
            self._cells_cached = self.cache.cached_cells()

    def _finish_event(self, request: Request, reason: str, error: str | None = None) -> Finish:
        request.done = True
        now = time.perf_counter()
        started = request.started_at or now
        first = request.first_at or now
        finish = Finish(
            reason=reason,
            prompt_tokens=len(request.prompt),
            completion_tokens=request.generated,
            queue_seconds=started - request.submitted_at,
            prompt_seconds=first - started,
            generation_seconds=(request.last_at - first) if request.first_at else 0.0,
            total_seconds=now - request.submitted_at,
            error=error,
            cached_tokens=request.cached,
        )
        if self.observer is not None:
            if request.gaps:
                self.observer.on_inter_token(request.gaps)
            self.observer.on_finished(finish)
        return finish

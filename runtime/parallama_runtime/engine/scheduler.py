"""The engine: one llama.cpp model, one context, N slots and a continuous-batching scheduler.

Why this shape:

* One context with ``n_seq_max = slots`` and ``kv_unified = false`` gives every slot its own KV
  stream of ``num_ctx`` cells, which is exactly what the memory model plans; a slot is a sequence id.
* A single scheduler thread owns the context. Each step it packs the next token of every generating
  slot plus prompt chunks of newly admitted requests into ONE ``llama_batch`` and calls
  ``llama_decode`` once, so the matrix products are shared by all slots (that is where the
  throughput of parallel slots comes from). Sampling uses llama.cpp's C sampler chains, one per
  slot, reading the logits of that slot's row of the batch.
* Results cross to asyncio with one ``call_soon_threadsafe`` per step and loop (not per token), which
  keeps per-step Python overhead small next to the decode.

The engine knows asyncio (it hands out :class:`RequestHandle` objects that are async iterators) but
nothing about HTTP: errors are exceptions the API maps to status codes.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import ctypes
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..planning.memory import KVCacheType, MemoryConfig
from ..termination import Failure, FailureReason, allocation_failure_line
from .llama_log import LlamaLogCapture, ParsedReports, parse_buffer_reports

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

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine cannot take or finish a request (not loaded, shutting down, decode failure)."""


class EngineLoadError(EngineError):
    """llama.cpp could not load the model or create the context; ``failure`` says why, in the
    termination message's terms (an allocation failure, an unreadable file...)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


ALLOC_FAILED = -2
"""``llama_decode``'s answer for ``GGML_STATUS_ALLOC_FAILED`` (llama-context.cpp): the compute
buffers could not be allocated. 1 (no KV slot), 2 (aborted), -1 (bad batch) and -3 (compute failed)
are not allocation failures."""


class QueueFullError(EngineError):
    """Every slot is busy and the waiting queue is at its bound; the client should retry later."""


class PromptTooLongError(EngineError):
    """The prompt does not fit one slot's context and the request did not ask to truncate."""


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    num_parallel: int = 1
    num_ctx: int = 4096
    kv_cache_type: KVCacheType = KVCacheType.F16
    flash_attention: bool = True
    gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()
    threads: int | None = None
    max_queue: int = 64
    n_batch: int = 512
    swa_full: bool = False
    """Full-size caches for sliding-window layers; False keeps llama-server's small window cache."""

    @property
    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(
            num_ctx=self.num_ctx,
            num_parallel=self.num_parallel,
            kv_cache_type=self.kv_cache_type,
            flash_attention=self.flash_attention,
            n_ubatch=self.n_batch,
            swa_full=self.swa_full,
        )


@dataclass
class SamplingParams:
    """Per-request sampling; defaults are Ollama's. ``temperature <= 0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens (benchmarks and tests want fixed lengths)."""


@dataclass(frozen=True)
class TextChunk:
    text: str


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


Event = TextChunk | Finish


class EngineObserver(Protocol):
    """Hooks the metrics layer implements; called from the scheduler thread, so they must be cheap."""

    def on_admitted(self, queue_seconds: float, prompt_tokens: int) -> None: ...

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
    kv_cells_total: int


class _Request:
    __slots__ = (
        "cancelled",
        "done",
        "first_at",
        "gaps",
        "id",
        "last_at",
        "loop",
        "params",
        "prompt",
        "queue",
        "started_at",
        "submitted_at",
    )

    def __init__(
        self, rid: int, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.submitted_at = time.perf_counter()
        self.started_at = 0.0
        self.first_at = 0.0
        self.last_at = 0.0
        self.gaps: list[float] = []
        self.cancelled = False
        self.done = False


class RequestHandle:
    """What the API holds for a submitted request: iterate for events, cancel to free the slot."""

    def __init__(self, engine: Engine, request: _Request) -> None:
        self._engine = engine
        self._request = request
        self.prompt_tokens = len(request.prompt)
        self.truncated = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._request.queue.get()
            yield event
            if isinstance(event, Finish):
                return

    def cancel(self) -> None:
        """Idempotent; a no-op once the request finished."""
        if not self._request.done:
            self._engine._cancel(self._request)


class _Slot:
    __slots__ = (
        "decoder",
        "fed",
        "generated",
        "index",
        "logit_index",
        "n_past",
        "next_token",
        "pending_text",
        "request",
        "sampler",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.request: _Request | None = None
        self.sampler: Any = None
        self.n_past = 0
        self.fed = 0  # prompt tokens already in the KV cache
        self.next_token = -1
        self.generated = 0
        self.logit_index = -1
        self.pending_text = ""
        self.decoder: codecs.IncrementalDecoder = codecs.getincrementaldecoder("utf-8")("replace")


class Engine:
    """Owns llama.cpp. :meth:`load` then :meth:`start`; :meth:`submit` from an asyncio loop."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None) -> None:
        if config.num_parallel < 1 or config.num_ctx < 1:
            raise ValueError("num_parallel and num_ctx must be positive")
        self.config = config
        self.observer = observer
        self._lib: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._memory: Any = None
        self._batch: Any = None
        self._arrays: tuple[Any, ...] = ()
        self._slots = [_Slot(i) for i in range(config.num_parallel)]
        self._pending: collections.deque[_Request] = collections.deque()
        self._cancels: list[_Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = 0
        self._pieces: dict[int, bytes] = {}
        self._busy_max = 0
        self._queue_max = 0
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
        self.kv_cells_per_slot = config.num_ctx

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the model and create the context; blocking (call it off the event loop)."""
        import llama_cpp as lib

        self._lib = lib
        capture = LlamaLogCapture.install()
        mark = capture.mark()
        lib.llama_backend_init()
        cfg = self.config
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = cfg.gpu_layers if cfg.gpu_layers >= 0 else 999
        # No CPU "extra" buffer types (AMX, CPU_REPACK): with them llama.cpp keeps a second, repacked
        # copy of CPU-resident weights whose size depends on the CPU's features, which no plan made
        # elsewhere (the operator's) can know. GPU replicas keep nothing but the embeddings on the CPU,
        # so they lose nothing; see docs/memory-model.md.
        mparams.use_extra_bufts = False
        if cfg.tensor_split:
            split = (ctypes.c_float * max(lib.LLAMA_MAX_DEVICES, len(cfg.tensor_split)))()
            for i, share in enumerate(cfg.tensor_split):
                split[i] = share
            self._split = split  # llama.cpp reads it during load; keep it alive
            mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        model = lib.llama_model_load_from_file(cfg.model_path.encode(), mparams)
        if not model:
            raise EngineLoadError(self._load_failure(capture.since(mark), "model"))
        self._model = model
        mem = cfg.memory_config
        threads = cfg.threads or os.cpu_count() or 1
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cfg.num_ctx * cfg.num_parallel
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        cparams.n_seq_max = cfg.num_parallel
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.swa_full = cfg.swa_full
        cparams.type_k = mem.type_k.ggml_type
        cparams.type_v = mem.type_v.ggml_type
        cparams.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attention else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            self._model = None
            raise EngineLoadError(self._load_failure(capture.since(mark), "context"))
        self._ctx = ctx
        self.reports = parse_buffer_reports(capture.since(mark))
        self._vocab = lib.llama_model_get_vocab(model)
        self._memory = lib.llama_get_memory(ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self.bos_token_id = lib.llama_vocab_bos(self._vocab)
        self.eos_token_id = lib.llama_vocab_eos(self._vocab)
        self.bos_text = self._piece(self.bos_token_id, special=True).decode("utf-8", "replace")
        self.eos_text = self._piece(self.eos_token_id, special=True).decode("utf-8", "replace")
        template = lib.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8", "replace") if template else None
        self.n_params = int(lib.llama_model_n_params(model))
        desc = ctypes.create_string_buffer(256)
        lib.llama_model_desc(model, desc, 256)
        self.model_description = desc.value.decode("utf-8", "replace")
        self.kv_cells_per_slot = int(lib.llama_n_ctx_seq(ctx))  # per stream, padded to 256
        self._make_batch()
        self.loaded = True
        self._capture = capture
        capture.watch(self._on_log_line)
        log.info(
            "context ready: %d slots x %d tokens, KV %s/%s, flash attention %s, %d threads",
            cfg.num_parallel,
            cfg.num_ctx,
            mem.type_k,
            mem.type_v,
            "on" if cfg.flash_attention else "off",
            threads,
        )

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

    def _make_batch(self) -> None:
        """One batch, reused every step, backed by our own ctypes arrays (slice-assignable)."""
        lib = self._lib
        n = self.config.n_batch
        tokens = (ctypes.c_int32 * n)()
        pos = (ctypes.c_int32 * n)()
        n_seq = (ctypes.c_int32 * n)(*([1] * n))
        seq_store = (ctypes.c_int32 * n)()
        seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * n)()
        base = ctypes.addressof(seq_store)
        for i in range(n):
            seq_ptrs[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32))
        logits = (ctypes.c_int8 * n)()
        batch = lib.llama_batch()
        batch.n_tokens = 0
        batch.token = ctypes.cast(tokens, ctypes.POINTER(ctypes.c_int32))
        batch.embd = None
        batch.pos = ctypes.cast(pos, ctypes.POINTER(ctypes.c_int32))
        batch.n_seq_id = ctypes.cast(n_seq, ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ctypes.cast(seq_ptrs, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        batch.logits = ctypes.cast(logits, ctypes.POINTER(ctypes.c_int8))
        self._batch = batch
        self._arrays = (tokens, pos, n_seq, seq_store, seq_ptrs, logits)

    # ------------------------------------------------------------------ text

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[: max(n, 0)]

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if not self.loaded:
            raise EngineError("model is not loaded yet")
        data = text.encode("utf-8")
        room = len(data) + 8
        buf = (ctypes.c_int32 * room)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, room, add_special, parse_special)
        if n < 0:
            room = -n
            buf = (ctypes.c_int32 * room)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, room, add_special, parse_special)
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", "replace")

    # ------------------------------------------------------------------ API side

    def start(self) -> None:
        if not self.loaded:
            raise EngineError("load() the model before start()")
        self._thread = threading.Thread(target=self._run, name="parallama-scheduler", daemon=True)
        self._thread.start()

    def submit(
        self, prompt: Sequence[int], params: SamplingParams, *, truncate: bool = False
    ) -> RequestHandle:
        """Queue a tokenized prompt; must be called from the asyncio loop that will read events."""
        if not self.loaded or self._thread is None:
            raise EngineError("model is not loaded yet")
        if self.failed:
            raise EngineError("the scheduler failed; see the server log")
        num_ctx = self.config.num_ctx
        tokens = list(prompt)
        if not tokens:
            tokens = [self.bos_token_id] if self.bos_token_id >= 0 else []
        if not tokens:
            raise EngineError("empty prompt")
        was_truncated = False
        if len(tokens) >= num_ctx:
            if not truncate:
                raise PromptTooLongError(
                    f"prompt is {len(tokens)} tokens but the context of a slot holds {num_ctx} "
                    f"(num_ctx); shorten it or ask to truncate"
                )
            keep = num_ctx - max(1, min(params.max_tokens, num_ctx // 4))
            head = [tokens[0]] if tokens[0] == self.bos_token_id else []
            tokens = head + tokens[len(tokens) - (keep - len(head)) :]
            was_truncated = True
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._stopping:
                raise EngineError("server is shutting down")
            busy = sum(1 for s in self._slots if s.request is not None)
            free = len(self._slots) - busy
            if len(self._pending) >= self.config.max_queue + max(free, 0):
                raise QueueFullError(
                    f"all {len(self._slots)} slots are busy and {len(self._pending)} requests are "
                    f"waiting (max queue {self.config.max_queue})"
                )
            self._ids += 1
            request = _Request(self._ids, tokens, params, loop)
            self._pending.append(request)
            self._queue_max = max(self._queue_max, len(self._pending))
            self._cond.notify()
        handle = RequestHandle(self, request)
        handle.truncated = was_truncated
        return handle

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            if request.done or request.cancelled:
                return
            request.cancelled = True
            self._cancels.append(request)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            busy = sum(1 for s in self._slots if s.request is not None)
            used = sum(s.n_past for s in self._slots if s.request is not None)
            return EngineStats(
                slots_total=len(self._slots),
                slots_busy=busy,
                slots_busy_max=self._busy_max,
                queue_depth=len(self._pending),
                queue_depth_max=self._queue_max,
                kv_cells_used=used,
                kv_cells_total=self.kv_cells_per_slot * len(self._slots),
            )

    def reset_peaks(self) -> None:
        """Start a new observation window for the high-water marks (slots busy, queue depth)."""
        with self._cond:
            self._busy_max = sum(1 for s in self._slots if s.request is not None)
            self._queue_max = len(self._pending)

    def in_flight(self) -> int:
        with self._cond:
            return len(self._pending) + sum(1 for s in self._slots if s.request is not None)

    def stop_admitting(self) -> None:
        with self._cond:
            self._stopping = True

    def cancel_all(self) -> None:
        with self._cond:
            for request in list(self._pending) + [s.request for s in self._slots if s.request]:
                if not request.cancelled and not request.done:
                    request.cancelled = True
                    self._cancels.append(request)
            self._cond.notify()

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
        for slot in self._slots:
            if slot.sampler is not None:
                lib.llama_sampler_free(slot.sampler)
                slot.sampler = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None
        self.loaded = False

    # ------------------------------------------------------------------ scheduler thread

    _thread_exit = False

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here must not leave clients hanging forever
            log.exception("scheduler crashed")
            self.failed = True
            self._fail_everything("internal error in the scheduler")

    def _fail_everything(self, message: str) -> None:
        with self._cond:
            self._stopping = True
            requests = list(self._pending) + [s.request for s in self._slots if s.request]
            self._pending.clear()
        outbox: list[tuple[_Request, Event]] = []
        for slot in self._slots:
            if slot.request is not None:
                self._release(slot)
        for request in requests:
            outbox.append((request, self._finish_event(request, "error", 0, error=message)))
        self._deliver(outbox)

    def _loop(self) -> None:
        lib = self._lib
        ctx = self._ctx
        batch = self._batch
        tokens_arr, pos_arr, _, seq_arr, _, logits_arr = self._arrays
        n_batch = self.config.n_batch
        slots = self._slots
        while True:
            outbox: list[tuple[_Request, Event]] = []
            with self._cond:
                while (
                    not self._thread_exit
                    and not self._cancels
                    and not (self._pending and any(s.request is None for s in slots))
                ):
                    if any(s.request is not None for s in slots):
                        break
                    self._cond.wait()
                if self._thread_exit and not any(s.request for s in slots) and not self._pending:
                    return
                cancels, self._cancels = self._cancels, []
                for request in cancels:
                    if request.done:
                        continue
                    with contextlib.suppress(ValueError):
                        self._pending.remove(request)
                admitted: list[_Slot] = []
                for slot in slots:
                    if slot.request is None and self._pending:
                        slot.request = self._pending.popleft()
                        admitted.append(slot)
                busy = sum(1 for s in slots if s.request is not None)
                if busy > self._busy_max:
                    self._busy_max = busy
            for request in cancels:
                if request.done:
                    continue
                holder = next((s for s in slots if s.request is request), None)
                generated = holder.generated if holder is not None else 0
                if holder is not None:
                    self._release(holder)
                outbox.append((request, self._finish_event(request, "cancelled", generated)))
            now = time.perf_counter()
            for slot in admitted:
                self._admit(slot, now)

            # ---- build one batch: one token per generating slot, then prompt chunks
            n = 0
            tok: list[int] = []
            pos: list[int] = []
            seq: list[int] = []
            out: list[int] = []
            for slot in slots:
                if slot.request is not None and slot.fed >= len(slot.request.prompt):
                    tok.append(slot.next_token)
                    pos.append(slot.n_past)
                    seq.append(slot.index)
                    out.append(1)
                    slot.logit_index = n
                    n += 1
                else:
                    slot.logit_index = -1
            prefilling: list[tuple[_Slot, int]] = []
            for slot in slots:
                filling = slot.request
                if filling is None or slot.fed >= len(filling.prompt) or n >= n_batch:
                    continue
                take = min(len(filling.prompt) - slot.fed, n_batch - n)
                start = slot.fed
                tok.extend(filling.prompt[start : start + take])
                pos.extend(range(slot.n_past, slot.n_past + take))
                seq.extend([slot.index] * take)
                out.extend([0] * take)
                n += take
                if start + take == len(filling.prompt):
                    out[-1] = 1
                    slot.logit_index = n - 1
                prefilling.append((slot, take))
            if n == 0:
                if outbox:
                    self._deliver(outbox)
                continue
            tokens_arr[:n] = tok
            pos_arr[:n] = pos
            seq_arr[:n] = seq
            logits_arr[:n] = out
            batch.n_tokens = n
            rc = self._decode(ctx, batch)
            if rc != 0:
                log.error("llama_decode failed with %d for a batch of %d tokens", rc, n)
                tail = self._capture.tail(20) if self._capture is not None else []
                allocation = allocation_failure_line(tail) if rc < 0 else None
                if rc == ALLOC_FAILED or allocation is not None or self.fatal is not None:
                    # out of memory: this context cannot serve its planned slots; exit and say so
                    self._report_fatal(allocation or f"llama_decode failed ({rc}): could not allocate")
                    self.failed = True
                    self._deliver(outbox)
                    self._fail_everything(f"out of memory while serving (llama_decode {rc})")
                    return
                in_batch = {s.index for s in slots if s.logit_index >= 0} | {s.index for s, _ in prefilling}
                for slot in slots:
                    failed = slot.request
                    if failed is not None and slot.index in in_batch:
                        self._release(slot)
                        message = f"llama_decode failed ({rc})"
                        outbox.append((failed, self._finish_event(failed, "error", 0, error=message)))
                self._deliver(outbox)
                continue
            for slot, take in prefilling:
                slot.fed += take
                slot.n_past += take
            now = time.perf_counter()
            for slot in slots:
                if slot.logit_index < 0 or slot.request is None:
                    continue
                if slot.generated > 0:
                    slot.n_past += 1  # the token fed this step is now in the cache
                token = lib.llama_sampler_sample(slot.sampler, ctx, slot.logit_index)
                self._on_token(slot, token, now, outbox)
            if outbox:
                self._deliver(outbox)

    def _admit(self, slot: _Slot, now: float) -> None:
        lib = self._lib
        request = slot.request
        assert request is not None
        request.started_at = now
        p = request.params
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(
                    self.n_vocab, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                ),
            )
        if p.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(p.top_k))
            if 0 < p.top_p < 1:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(p.min_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else random.getrandbits(32)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        if p.repeat_penalty != 1.0 and p.repeat_last_n:
            for token in request.prompt[-p.repeat_last_n :]:
                lib.llama_sampler_accept(chain, token)
        slot.sampler = chain
        slot.n_past = 0
        slot.fed = 0
        slot.generated = 0
        slot.next_token = -1
        slot.pending_text = ""
        slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        if self.observer is not None:
            self.observer.on_admitted(now - request.submitted_at, len(request.prompt))

    def _release(self, slot: _Slot) -> None:
        """Free a slot now: its KV cells are cleared so the next request starts from nothing."""
        lib = self._lib
        lib.llama_memory_seq_rm(self._memory, slot.index, -1, -1)
        if slot.sampler is not None:
            lib.llama_sampler_free(slot.sampler)
            slot.sampler = None
        request = slot.request
        with self._cond:
            slot.request = None
            slot.n_past = 0
            slot.fed = 0
            if request is not None:
                request.done = True

    def _on_token(self, slot: _Slot, token: int, now: float, outbox: list[tuple[_Request, Event]]) -> None:
        request = slot.request
        assert request is not None
        slot.generated += 1
        if slot.generated == 1:
            request.first_at = now
            if self.observer is not None:
                self.observer.on_first_token(now - request.submitted_at)
        else:
            request.gaps.append(now - request.last_at)
        request.last_at = now
        params = request.params
        if not params.ignore_eos and self._lib.llama_vocab_is_eog(self._vocab, token):
            slot.generated -= 1  # the end-of-generation token is not part of the answer
            self._complete(slot, "stop", outbox)
            return
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._piece(token)
            self._pieces[token] = piece
        text = slot.decoder.decode(piece)
        if params.stop:
            text = slot.pending_text + text
            for stop in params.stop:
                at = text.find(stop)
                if at >= 0:
                    if at:
                        outbox.append((request, TextChunk(text[:at])))
                    slot.pending_text = ""
                    self._complete(slot, "stop", outbox)
                    return
            hold = _held_back(text, params.stop)
            slot.pending_text = text[len(text) - hold :] if hold else ""
            text = text[: len(text) - hold]
        outbox.append((request, TextChunk(text)))  # even empty: one chunk per token keeps TTFT honest
        if slot.generated >= params.max_tokens or slot.n_past >= self.config.num_ctx:
            self._complete(slot, "length", outbox)
            return
        slot.next_token = token

    def _complete(self, slot: _Slot, reason: str, outbox: list[tuple[_Request, Event]]) -> None:
        request = slot.request
        assert request is not None
        tail = slot.pending_text + slot.decoder.decode(b"", final=True)
        if tail and reason != "stop":
            outbox.append((request, TextChunk(tail)))
        generated = slot.generated
        self._release(slot)
        outbox.append((request, self._finish_event(request, reason, generated)))

    def _finish_event(
        self, request: _Request, reason: str, generated: int, error: str | None = None
    ) -> Finish:
        request.done = True
        now = time.perf_counter()
        started = request.started_at or now
        first = request.first_at or now
        finish = Finish(
            reason=reason,
            prompt_tokens=len(request.prompt),
            completion_tokens=generated,
            queue_seconds=started - request.submitted_at,
            prompt_seconds=first - started,
            generation_seconds=(request.last_at - first) if request.first_at else 0.0,
            total_seconds=now - request.submitted_at,
            error=error,
        )
        if self.observer is not None:
            if request.gaps:
                self.observer.on_inter_token(request.gaps)
            self.observer.on_finished(finish)
        return finish

    @staticmethod
    def _deliver(outbox: list[tuple[_Request, Event]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Event]]] = {}
        for item in outbox:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[_Request, Event]]) -> None:
    for request, event in items:
        request.queue.put_nowait(event)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop sequence."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best

"""llama.cpp through llama-cpp-python's ctypes binding: loading, the context, the batch, text.

Everything here is a thin, typed wrapper around one llama.cpp call or a small group of them, so the
scheduler reads as policy. Nothing here decides anything a plan depends on except
:func:`context_params`, which is where the runtime's layout (one unified KV pool) is fixed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from ..planning.memory import sequence_ids as planned_sequence_ids
from .values import EngineConfig

__all__ = ["Batch", "LlamaMemory", "Vocab", "context_params", "model_params", "sequence_ids"]


def model_params(lib: Any, config: EngineConfig) -> tuple[Any, Any]:
    """llama_model_params for ``config``, and the tensor-split array llama.cpp reads during load
    (keep it alive until the model is loaded)."""
    params = lib.llama_model_default_params()
    params.n_gpu_layers = config.gpu_layers if config.gpu_layers >= 0 else 999
    # No CPU "extra" buffer types (AMX, CPU_REPACK): with them llama.cpp keeps a second, repacked
    # copy of CPU-resident weights whose size depends on the CPU's features, which no plan made
    # elsewhere (the operator's) can know. GPU replicas keep nothing but the embeddings on the CPU,
    # so they lose nothing; see docs/memory-model.md.
    params.use_extra_bufts = False
    split = None
    if config.tensor_split:
        split = (ctypes.c_float * max(lib.LLAMA_MAX_DEVICES, len(config.tensor_split)))()
        for i, share in enumerate(config.tensor_split):
            split[i] = share
        params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
    return params, split


def sequence_ids(config: EngineConfig, *, recurrent: bool, sliding_window: int) -> int:
    """How many sequence ids the context gets: the memory model's rule
    (:func:`~parallama_runtime.planning.memory.sequence_ids`), so the plan describes this context.

    ``recurrent``: llama.cpp's ``llama_model_is_recurrent`` or ``_is_hybrid``; ``sliding_window``:
    ``llama_model_n_swa``."""
    return planned_sequence_ids(
        config.num_parallel,
        recurrent=recurrent,
        sliding_window=sliding_window,
        swa_full=config.swa_full,
        prompt_cache=config.prompt_cache,
    )


def context_params(lib: Any, config: EngineConfig, n_seq_max: int, threads: int) -> Any:
    """The runtime's layout: ONE unified KV pool of ``num_ctx x num_parallel`` cells (llama.cpp pads
    it to 256), so every busy sequence decodes in one micro-batch whatever its id, and finished
    prefixes can be shared between sequences. The scheduler holds each request to ``num_ctx``."""
    mem = config.memory_config
    params = lib.llama_context_default_params()
    params.n_ctx = config.num_ctx * config.num_parallel
    params.n_batch = config.n_batch
    params.n_ubatch = config.n_batch
    params.n_seq_max = n_seq_max
    params.n_threads = threads
    params.n_threads_batch = threads
    params.kv_unified = True
    params.swa_full = config.swa_full
    params.type_k = mem.type_k.ggml_type
    params.type_v = mem.type_v.ggml_type
    params.flash_attn_type = (
        lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attention else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.no_perf = True
    return params


@dataclass
class LlamaMemory:
    """:class:`~.prompt_cache.KVMemory` over ``llama_memory_seq_*``."""

    lib: Any
    handle: Any

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.handle, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.lib.llama_memory_seq_cp(self.handle, src, dst, p0, p1)

    def seq_pos_min(self, seq_id: int) -> int:
        return int(self.lib.llama_memory_seq_pos_min(self.handle, seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.handle, seq_id))


class Batch:
    """One ``llama_batch`` reused every step, backed by ctypes arrays that take slice assignment
    (filling a batch is one C-level copy per field, not a Python loop over tokens)."""

    def __init__(self, lib: Any, capacity: int) -> None:
        # typed Any: ctypes arrays take lists of ints, which their stubs do not say
        self.tokens: Any = (ctypes.c_int32 * capacity)()
        self.positions: Any = (ctypes.c_int32 * capacity)()
        self._n_seq = (ctypes.c_int32 * capacity)(*([1] * capacity))
        self.seq_ids: Any = (ctypes.c_int32 * capacity)()
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)()
        base = ctypes.addressof(self.seq_ids)
        for i in range(capacity):
            self._seq_ptrs[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32))
        self.logits: Any = (ctypes.c_int8 * capacity)()
        batch = lib.llama_batch()
        batch.n_tokens = 0
        batch.token = ctypes.cast(self.tokens, ctypes.POINTER(ctypes.c_int32))
        batch.embd = None
        batch.pos = ctypes.cast(self.positions, ctypes.POINTER(ctypes.c_int32))
        batch.n_seq_id = ctypes.cast(self._n_seq, ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        batch.logits = ctypes.cast(self.logits, ctypes.POINTER(ctypes.c_int8))
        self.handle = batch

    def fill(self, tokens: list[int], positions: list[int], seq_ids: list[int], logits: list[int]) -> None:
        n = len(tokens)
        self.tokens[:n] = tokens
        self.positions[:n] = positions
        self.seq_ids[:n] = seq_ids
        self.logits[:n] = logits
        self.handle.n_tokens = n


class Vocab:
    """Tokenizing and detokenizing; llama.cpp's vocab is read-only, so any thread may call these."""

    def __init__(self, lib: Any, handle: Any) -> None:
        self._lib = lib
        self.handle = handle
        self.n_tokens = int(lib.llama_vocab_n_tokens(handle))
        self.bos = int(lib.llama_vocab_bos(handle))
        self.eos = int(lib.llama_vocab_eos(handle))
        self._pieces: dict[int, bytes] = {}
        self.max_token_bytes = self._longest_token()
        """No token stands for more input bytes than this (0: unknown), so ``bytes / max_token_bytes``
        is a lower bound on a text's token count that the API can check before tokenizing."""

    def _longest_token(self) -> int:
        """The longest token text, llama.cpp's "max token length". BPE's byte-to-unicode form and
        SentencePiece's ``▁``/``<0xXX>`` forms are never shorter than the bytes they stand for, so
        this bounds input bytes per token; WPM and UGM normalise input (dropping bytes), so no bound."""
        lib = self._lib
        if int(lib.llama_vocab_type(self.handle)) in (lib.LLAMA_VOCAB_TYPE_WPM, lib.LLAMA_VOCAB_TYPE_UGM):
            return 0
        return max(
            (len(lib.llama_vocab_get_text(self.handle, t) or b"") for t in range(self.n_tokens)), default=0
        )

    def piece(self, token: int, *, special: bool = False) -> bytes:
        if not special:
            cached = self._pieces.get(token)
            if cached is not None:
                return cached
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.handle, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.handle, token, buf, -n, 0, special)
        piece = buf.raw[: max(n, 0)]
        if not special:
            self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.handle, token))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        buf = (ctypes.c_int32 * room)()
        n = self._lib.llama_tokenize(self.handle, data, len(data), buf, room, add_special, parse_special)
        if n < 0:
            room = -n
            buf = (ctypes.c_int32 * room)()
            n = self._lib.llama_tokenize(self.handle, data, len(data), buf, room, add_special, parse_special)
        return list(buf[:n])

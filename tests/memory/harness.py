"""Create llama.cpp contexts exactly as the runtime does and read back what llama.cpp allocated.

The memory tests compare the memory model with these readings. llama.cpp reports its buffers in its
log (MiB with two decimals) and the cell counts of its caches; the bytes of one KV cell are read to
the byte from the growth of a sequence's saved state (llama.cpp serialises a sequence's cells with
their K and V rows, plus 12 bytes of cell metadata per cell), and a sequence's recurrent state
from its saved size.

The runtime's layout, and so the default here, is one unified KV pool (``kv_unified = true``,
``n_ctx = num_ctx x slots`` in one stream) with ``n_seq_max`` sequence ids; a :class:`Setting` can
also ask for the per-sequence streams llama.cpp gives without ``kv_unified``, and for more sequence
ids than slots (the runtime's prompt cache).
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from parallama_runtime.engine.llama_log import LlamaLogCapture, ParsedReports, parse_buffer_reports
from parallama_runtime.planning.memory import KVCacheType, MemoryConfig

__all__ = [
    "COMPUTE_TOLERANCE",
    "PRINTED",
    "Measured",
    "Setting",
    "capture",
    "load",
    "measure",
    "measure_setting",
]

MiB = 1024 * 1024
CELL_METADATA_BYTES = 12
"""Per cell in a sequence's saved state: position (4), sequence count (4), sequence id (4)."""
PRINTED = 0.005 + 1e-6
"""llama.cpp prints MiB with two decimals: a planned size must round to the printed one."""
COMPUTE_TOLERANCE = 0.10
"""The issue's bar for the compute buffer, on llama.cpp's CPU backend."""


@dataclass(frozen=True)
class Setting:
    """One context the runtime could create: the memory model's config and the test id in one."""

    num_ctx: int
    slots: int
    kv: KVCacheType
    flash_attention: bool
    swa_full: bool = False
    unified: bool = True
    """One KV stream for every sequence (the runtime's layout); False: a stream per sequence id."""
    n_seq_max: int | None = None
    """Sequence ids; None: one per slot."""

    @property
    def sequences(self) -> int:
        return self.n_seq_max or self.slots

    def config(self) -> MemoryConfig:
        return MemoryConfig(
            num_ctx=self.num_ctx,
            num_parallel=self.slots,
            kv_cache_type=self.kv,
            flash_attention=self.flash_attention,
            gpu_layers=0,
            swa_full=self.swa_full,
            kv_unified=self.unified,
            n_seq_max=self.sequences,
        )

    def __str__(self) -> str:
        fa = "fa" if self.flash_attention else "nofa"
        full = "-swafull" if self.swa_full else ""
        layout = "" if self.unified else "-streams"
        seqs = f"-seq{self.n_seq_max}" if self.n_seq_max else ""
        return f"{self.num_ctx}x{self.slots}-{self.kv.value}-{fa}{full}{layout}{seqs}"


@functools.cache
def capture() -> LlamaLogCapture:
    log = LlamaLogCapture.install()
    llama_cpp.llama_backend_init()
    return log


@dataclass
class Loaded:
    path: Path
    model: Any
    load_log: list[str]

    @property
    def reports(self) -> ParsedReports:
        return parse_buffer_reports(self.load_log)


@functools.cache
def load(path: Path) -> Loaded:
    """Load a model on the CPU (cached for the session; never freed: tests reuse it)."""
    log = capture()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = False  # as the runtime does: see docs/memory-model.md
    mark = log.mark()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    lines = log.since(mark)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}:\n" + "\n".join(lines[-15:]))
    return Loaded(path, model, lines)


@dataclass
class Measured:
    refused: str | None = None
    """llama.cpp's error line when it refused the context; the fields below are then unset."""
    reports: ParsedReports = field(default_factory=ParsedReports)
    log: list[str] = field(default_factory=list)
    kv_cell_bytes: int | None = None
    """KV bytes of one cell over all layers (full and sliding-window caches), to the byte."""
    seq_state_bytes: int | None = None
    """Saved-state size of a sequence after one token: what one slot holds beyond its cells."""

    @property
    def kv_mib(self) -> float:
        return sum(kv.mib for kv in self.reports.kv_caches)

    @property
    def compute_mib(self) -> float:
        return self.reports.total_mib("compute")

    @property
    def output_mib(self) -> float:
        """The logits buffer (``llama_context::output_reserve``), host memory."""
        return self.reports.total_mib("output")


_ERROR = re.compile(
    r"(llama_init_from_model|llama_context|init):.*(requires|does not|cannot|failed|not support)"
)


def measure(
    path: Path,
    *,
    num_ctx: int,
    slots: int,
    type_k: KVCacheType = KVCacheType.F16,
    type_v: KVCacheType = KVCacheType.F16,
    flash_attention: bool = True,
    swa_full: bool = False,
    kv_unified: bool = True,
    n_seq_max: int | None = None,
    n_ubatch: int = 512,
    state: bool = True,
) -> Measured:
    """Create a context as the runtime would (``n_ctx = num_ctx * slots``, one unified KV pool,
    ``n_seq_max`` sequence ids, one per slot by default) and read its allocations; with ``state``,
    decode one and then two more tokens in sequence 0 to read the bytes of a cell from the saved
    state's growth."""
    loaded = load(path)
    log = capture()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = num_ctx * slots
    params.n_seq_max = n_seq_max or slots
    params.n_batch = params.n_ubatch = n_ubatch
    params.kv_unified = kv_unified
    params.swa_full = swa_full
    params.flash_attn_type = 1 if flash_attention else 0
    params.type_k = type_k.ggml_type
    params.type_v = type_v.ggml_type
    params.n_threads = params.n_threads_batch = 2
    mark = log.mark()
    ctx = llama_cpp.llama_init_from_model(loaded.model, params)
    lines = log.since(mark)
    if not ctx:
        errors = [line for line in lines if _ERROR.search(line)] or lines[-3:] or ["(no log)"]
        return Measured(refused=errors[-1].strip(), log=lines)
    try:
        measured = Measured(reports=parse_buffer_reports(lines), log=lines)
        if state:
            sizes = []
            tokens = (llama_cpp.llama_token * 3)(3, 4, 5)
            for start, count in ((0, 1), (1, 2)):
                batch = llama_cpp.llama_batch_get_one(
                    ctypes.cast(ctypes.byref(tokens, start * 4), ctypes.POINTER(llama_cpp.llama_token)), count
                )
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed on {path}")
                sizes.append(llama_cpp.llama_state_seq_get_size(ctx, 0))
            measured.seq_state_bytes = sizes[0]
            measured.kv_cell_bytes = (sizes[1] - sizes[0]) // 2 - CELL_METADATA_BYTES
        return measured
    finally:
        llama_cpp.llama_free(ctx)


def measure_setting(path: Path, setting: Setting, *, state: bool = False) -> Measured:
    """:func:`measure` with ``setting``'s context (and the V type the runtime picks for it)."""
    # LlamaLogCapture trims its list past 20000 lines, which would shift the mark measure() takes
    # after a few hundred contexts: start every reading from an empty list
    capture().lines.clear()
    config = setting.config()
    return measure(
        path,
        num_ctx=setting.num_ctx,
        slots=setting.slots,
        type_k=config.type_k,
        type_v=config.type_v,
        flash_attention=setting.flash_attention,
        swa_full=setting.swa_full,
        kv_unified=setting.unified,
        n_seq_max=setting.sequences,
        state=state,
    )

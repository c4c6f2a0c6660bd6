"""The memory model: how many bytes llama.cpp allocates for a model, a context and its slots.

This module is pure arithmetic over a :class:`~parallama_runtime.planning.model_info.ModelInfo` and
its :class:`~parallama_runtime.planning.architectures.CacheLayout` (llama.cpp's per-architecture
rules). It mirrors the allocations llama.cpp makes when the runtime creates its context: one unified
KV pool (``kv_unified = true``, ``n_ctx = num_ctx * slots`` in one stream, the scheduler holding each
request to ``num_ctx``) and ``n_seq_max`` sequence ids (:func:`sequence_ids`: more than the slots
where extra ids cost no memory, so that finished conversations stay cached). It is checked against
llama.cpp's own buffer reports, family by family, in ``tests/memory``:

* **weights**: the tensors' bytes, per layer, on the device that layer is assigned to, with
  llama.cpp's layer-to-device rule (``upper_bound`` over cumulative split fractions); the token
  embedding table always stays in host memory, the output head goes with the last layer. The runtime
  turns llama.cpp's CPU "extra" buffer types off (AMX, CPU_REPACK), so weights are never copied
  a second time and the plan does not depend on the CPU's features (docs/memory-model.md).
* **KV cache** (``llama-kv-cache.cpp``): per attention layer and cell, ``row_size(type_k, n_embd_k_gqa)``
  plus ``row_size(type_v, n_embd_v_gqa)`` (no V with MLA; without flash attention V is transposed and
  every layer's V row is padded to the widest). With ``kv_unified`` all slots share one stream of
  ``n_ctx`` cells (``num_ctx * slots`` padded to 256); without it each of the ``n_seq_max``
  sequences owns a stream of ``n_ctx / n_seq_max`` cells padded to 256. Sliding-window layers get a
  small cache unless ``swa_full`` (``llama-kv-cache-iswa.cpp``): the window of every sequence id
  that may share the stream plus a micro-batch, padded to 256.
* **recurrent state** (``llama-memory-recurrent.cpp``): per recurrent layer, ``n_embd_r`` plus
  ``n_embd_s`` f32 values per sequence id, whatever the context length.
* **compute**: the scheduler's graph buffer for the worst-case micro-batch (``n_ubatch`` tokens split
  over ``n_seq_max`` sequences). It is a high-water mark of ggml's allocator: replayed for the
  transcribed graphs, a fit of its parts for the others (:func:`compute_buffer_bytes`). In the
  unified pool the attention masks and scores of every token span the whole pool.
* **output buffer** (``llama_context::output_reserve``): the logits of ``n_seq_max`` rows,
  ``n_vocab`` floats each, in host memory (pinned when a GPU computes the output).
* **embedding models** (a GGUF ``pooling_type`` of mean, cls or last: :meth:`MemoryConfig.for_model`):
  the runtime's context embeds, one input per slot and sequence id, a whole input per micro-batch
  (``n_ubatch`` = ``num_ctx``, :func:`embedding_batch`), so the compute buffer grows with
  ``num_ctx`` and the pool; every token of a batch is an output, so the output buffer holds
  ``n_batch`` rows of logits and embeddings.
* **overhead**: a fixed per-device amount (CUDA context, cuBLAS workspace), configurable.

:func:`context_refusal` says which settings llama.cpp refuses to create a context with, in its words.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from .architectures import CacheLayout, ComputeQuery, compute_rule
from .model_info import ModelInfo

__all__ = [
    "DEFAULT_CPU_OVERHEAD_BYTES",
    "DEFAULT_GPU_OVERHEAD_BYTES",
    "MAX_SEQUENCE_IDS",
    "DeviceMemory",
    "KVCacheType",
    "MemoryConfig",
    "MemoryEstimate",
    "compute_buffer_bytes",
    "context_refusal",
    "embedding_batch",
    "estimate_memory",
    "kv_bytes_per_token",
    "kv_cells_per_slot",
    "layer_devices",
    "output_buffer_bytes",
    "row_size",
    "sequence_ids",
    "swa_cells_per_slot",
]

MiB = 1024 * 1024
DEFAULT_GPU_OVERHEAD_BYTES = 576 * MiB
"""CUDA context, cuBLAS workspace and driver allocations beyond llama.cpp's own buffers: measured
520 to 526 MiB on an H100 with CUDA 13 (bench/cuda_memory.py, docs/memory-model.md), plus a margin."""
DEFAULT_CPU_OVERHEAD_BYTES = 256 * MiB
"""The runtime process itself (Python, aiohttp, llama.cpp's host-side structures)."""


class KVCacheType(StrEnum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"

    @property
    def is_quantized(self) -> bool:
        return self in (KVCacheType.Q8_0, KVCacheType.Q4_0)

    @property
    def block_size(self) -> int:
        return _BLOCKS[self][0]

    @property
    def ggml_type(self) -> int:
        """The ``ggml_type`` enum value llama.cpp's context parameters take."""
        return {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}[self.value]


# (block size in elements, bytes per block), as ggml's type traits
_BLOCKS: dict[KVCacheType, tuple[int, int]] = {
    KVCacheType.F32: (1, 4),
    KVCacheType.F16: (1, 2),
    KVCacheType.BF16: (1, 2),
    KVCacheType.Q8_0: (32, 34),
    KVCacheType.Q4_0: (32, 18),
}

_CELL_PADDING = 256
MAX_SEQUENCE_IDS = 256
"""llama.cpp's ``LLAMA_MAX_SEQ``: ``llama_init_from_model`` refuses a larger ``n_seq_max``."""


def row_size(kind: KVCacheType, elements: int) -> int:
    """ggml_row_size: bytes of one row of ``elements`` values stored as ``kind``."""
    block, size = _BLOCKS[kind]
    if elements % block:
        raise ValueError(f"{kind} rows need a multiple of {block} elements, got {elements}")
    return elements // block * size


def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def sequence_ids(
    num_parallel: int,
    *,
    recurrent: bool,
    sliding_window: int,
    swa_full: bool,
    prompt_cache: bool = True,
    embeddings: bool = False,
) -> int:
    """The ``n_seq_max`` the runtime gives a context of ``num_parallel`` slots over one unified pool.

    ``num_parallel`` run at once; with the prompt cache on, a model none of whose buffers grows with
    the sequence ids gets at least four per slot (16 or more, rounded up to a power of two, at most
    llama.cpp's 256), so finished
    conversations keep their cells in the pool until the space is needed. Not a model with recurrent
    state (``rs_size = n_seq_max``: one state per id) nor one with a small sliding-window cache
    (``sliding_window`` > 0 without ``swa_full``: in a unified pool it holds ``n_swa x n_seq_max``
    cells plus a micro-batch). What extra ids do cost elsewhere is small and counted: the reserved
    graph splits its micro-batch over them (its tokens round up to a multiple of ``n_seq_max``), and
    the output buffer keeps a row of logits per id. The engine creates its context with this number
    (``recurrent``: llama.cpp's ``llama_model_is_recurrent`` or ``_is_hybrid``; ``sliding_window``:
    ``llama_model_n_swa``), so that the plan describes what it allocates. An embedding context
    (``embeddings``) keeps nothing between requests: one id per slot.
    """
    if embeddings or not prompt_cache or recurrent or (sliding_window > 0 and not swa_full):
        return num_parallel
    # a power of two: it divides the 512-token micro-batch, so the reserved graph needs no rounding
    wanted = max(4 * num_parallel, 16)
    return min(MAX_SEQUENCE_IDS, 1 << (wanted - 1).bit_length())


def kv_cells_per_slot(
    num_ctx: int, num_parallel: int, *, unified: bool = False, n_seq_max: int | None = None
) -> int:
    """Cells of one KV stream for ``n_ctx = num_ctx * num_parallel`` (``llama_context``'s constructor).

    llama.cpp pads ``n_ctx`` to 256. With ``unified`` there is one stream for all sequences, of
    ``n_ctx`` cells: with the runtime's layout this is the whole pool, not one slot's share. Without
    it each of the ``n_seq_max`` sequences (default: one per slot) owns a stream of ``n_ctx / n_seq_max``
    cells, padded to 256 again.
    """
    n_ctx = _pad(num_ctx * num_parallel, _CELL_PADDING)
    if unified:
        return n_ctx
    return _pad(n_ctx // (n_seq_max or num_parallel), _CELL_PADDING)


def swa_cells_per_slot(
    layout: CacheLayout,
    num_ctx: int,
    num_parallel: int,
    *,
    n_ubatch: int,
    swa_full: bool,
    unified: bool = False,
    n_seq_max: int | None = None,
) -> int:
    """Cells of one stream of the sliding-window cache (``llama_kv_cache_iswa``'s constructor).

    ``min(base, n_swa * (unified ? n_seq_max : 1) + n_ubatch)`` padded to 256: the window plus room for
    one micro-batch, since llama.cpp evicts cells that left the window only after a batch. In a
    unified stream every sequence id may hold a window, so extra ids grow this cache.
    """
    sequences = n_seq_max or num_parallel
    base = kv_cells_per_slot(num_ctx, num_parallel, unified=unified, n_seq_max=sequences)
    if swa_full or not layout.has_swa:
        return base
    window = layout.sliding_window * (sequences if unified else 1)
    return _pad(min(base, window + n_ubatch), _CELL_PADDING)


def embedding_batch(num_ctx: int, n_seq_max: int) -> int:
    """``n_batch`` and ``n_ubatch`` of an embedding context: ``num_ctx`` rounded up to a multiple of
    ``n_seq_max``.

    A whole input must be one micro-batch (llama.cpp refuses to split a non-causal batch, and pools
    over the micro-batch's rows), so the batch holds ``num_ctx`` tokens. The rounding is llama.cpp's
    own need: ``graph_reserve`` rounds the reserved batch's tokens up to a multiple of ``n_seq_max``
    but keeps ``n_ubatch`` outputs, and mean pooling's ``n_tokens x n_seqs`` matrix then does not
    match the output rows: ``llama_init_from_model`` aborts the process (``ggml_can_mul_mat``) for,
    say, 1000 tokens over 3 sequences. Never more than the ``num_ctx x n_seq_max`` context.
    """
    sequences = max(1, n_seq_max)
    return -(-max(1, num_ctx) // sequences) * sequences


def output_buffer_bytes(
    model: ModelInfo, n_seq_max: int, *, embeddings: bool = False, n_outputs: int = 0
) -> int:
    """``llama_context::output_reserve``: f32 rows for ``max(n_outputs, n_seq_max)`` outputs.

    A row holds the ``n_vocab`` logits (always: ``has_logits`` is true in this llama.cpp), plus, in
    an embedding context, ``n_embd_out`` floats of embeddings. The context reserves ``n_seq_max``
    rows when it is created and grows the buffer (never shrinking it) for a batch asking more
    outputs. A generative runtime asks one per sequence it samples, so ``n_seq_max`` rows is its
    size; an embedding context outputs every token of a batch (``output_all``: pooling reads them
    all), so after a full batch it holds ``n_outputs`` = ``n_batch`` rows. Host memory (the output
    device's pinned host buffer type on a GPU).
    """
    row = model.vocab_size + (model.embedding_output_length if embeddings else 0)
    return 4 * row * max(1, n_seq_max, n_outputs)


@dataclass(frozen=True)
class MemoryConfig:
    """How the runtime will create its llama.cpp context; the inputs of the memory model."""

    num_ctx: int = 4096
    num_parallel: int = 1
    kv_cache_type: KVCacheType = KVCacheType.F16
    flash_attention: bool = True
    n_ubatch: int = 512
    gpu_layers: int = -1
    """Layers to offload; -1 offloads everything, including the output head. 0 is a CPU run."""
    tensor_split: tuple[float, ...] = (1.0,)
    """Share of the layers per GPU; its length is the number of GPUs (ignored when gpu_layers == 0)."""
    device_overhead_bytes: int = DEFAULT_GPU_OVERHEAD_BYTES
    swa_full: bool = False
    """Full-size caches for sliding-window layers; False is llama-server's default (a small cache)."""
    kv_unified: bool = True
    """One KV stream shared by all slots (the runtime's layout: any set of busy slots decodes in one
    micro-batch, and sequences can share cells); False gives every sequence id a stream of its own."""
    n_seq_max: int | None = None
    """Sequence ids of the context (llama.cpp's ``n_seq_max``, at least ``num_parallel``); None: what
    the runtime gives the model in its unified pool (:func:`sequence_ids`, prompt cache on), or one
    per slot with per-sequence streams."""
    embeddings: bool | None = None
    """An embedding context (llama.cpp's ``embeddings = true``, pooling from the model); None: what
    the model serves (:attr:`~.model_info.ModelInfo.task`), as the runtime decides at load. Such a
    context takes one id per slot and a batch of a whole input (:func:`embedding_batch`) in place
    of ``n_seq_max`` and ``n_ubatch``; :meth:`for_model` resolves them."""

    def for_model(self, model: ModelInfo) -> MemoryConfig:
        """This config as the runtime creates it for ``model``: an embedding model's context takes
        ``n_seq_max`` = the slots (one input each; the explicit value when given) and
        ``n_batch`` = ``n_ubatch`` = :func:`embedding_batch` (a whole input per micro-batch); a
        generative model's is this config, ``embeddings`` False."""
        embeddings = model.task == "embed" if self.embeddings is None else self.embeddings
        if not embeddings:
            return replace(self, embeddings=False)
        sequences = self.n_seq_max if self.n_seq_max is not None else self.num_parallel
        return replace(
            self, embeddings=True, n_seq_max=sequences, n_ubatch=embedding_batch(self.num_ctx, sequences)
        )

    def sequences(self, layout: CacheLayout) -> int:
        """``n_seq_max`` for a model of this ``layout``: the explicit one, or the runtime's rule."""
        if self.n_seq_max is not None:
            return self.n_seq_max
        if not self.kv_unified:
            return self.num_parallel
        return sequence_ids(
            self.num_parallel,
            recurrent=layout.has_recurrent,
            sliding_window=layout.sliding_window if layout.has_swa else 0,
            swa_full=self.swa_full,
            embeddings=bool(self.embeddings),
        )

    @property
    def effective_n_ubatch(self) -> int:
        """llama.cpp caps the batch at ``n_ctx`` (before padding) for causal models."""
        return max(1, min(self.n_ubatch, self.num_ctx * self.num_parallel))

    @property
    def type_k(self) -> KVCacheType:
        return self.kv_cache_type

    @property
    def type_v(self) -> KVCacheType:
        """llama.cpp refuses a quantized V cache without flash attention; the runtime then keeps f16."""
        if self.kv_cache_type.is_quantized and not self.flash_attention:
            return KVCacheType.F16
        return self.kv_cache_type

    @property
    def gpu_count(self) -> int:
        return 0 if self.gpu_layers == 0 else len(self.tensor_split)


@dataclass
class DeviceMemory:
    """Bytes one device holds. ``device`` is ``cpu`` or ``gpu<i>`` (index within the replica)."""

    device: str
    layers: int = 0
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    recurrent_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0
    """The logits buffer (:func:`output_buffer_bytes`), on the CPU device of a CPU-only replica; a
    GPU replica keeps it in host memory (``MemoryEstimate.host_bytes``)."""
    overhead_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.kv_cache_bytes
            + self.recurrent_bytes
            + self.compute_bytes
            + self.output_bytes
            + self.overhead_bytes
        )


@dataclass
class MemoryEstimate:
    """Per-device bytes of one replica, plus what the host keeps beside a GPU replica (the embedding
    table, the logits buffer, and layers left on the CPU)."""

    config: MemoryConfig
    devices: list[DeviceMemory]
    host_bytes: int
    kv_cells_per_slot: int
    """Cells of one KV stream: with the unified pool (the runtime's layout) every slot's cells,
    ``num_ctx x slots`` padded to 256; with per-sequence streams one stream's."""
    kv_bytes_per_token: int
    """KV bytes one more token of context costs: a cell of every layer whose cache grows with the
    context (sliding-window layers only with ``swa_full``)."""
    swa_cells_per_slot: int = 0
    """Cells of one stream of the sliding-window cache (as ``kv_cells_per_slot``)."""
    recurrent_bytes_per_slot: int = 0
    """Recurrent state of one sequence id."""
    n_seq_max: int = 1
    """Sequence ids the context was planned with."""
    output_buffer_bytes: int = 0
    """The logits buffer (host memory beside a GPU replica, the CPU device's otherwise)."""

    @property
    def weights_bytes(self) -> int:
        return sum(d.weights_bytes for d in self.devices)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(d.kv_cache_bytes for d in self.devices)

    @property
    def recurrent_bytes(self) -> int:
        return sum(d.recurrent_bytes for d in self.devices)

    @property
    def kv_bytes_per_slot(self) -> int:
        """Cache bytes one slot adds: its share of the KV cache plus its recurrent state (and that of
        the extra sequence ids it brings, should a model with recurrent state get any)."""
        slots = self.config.num_parallel
        return self.kv_cache_bytes // slots + self.recurrent_bytes_per_slot * self.n_seq_max // slots

    @property
    def compute_bytes(self) -> int:
        return sum(d.compute_bytes for d in self.devices)

    @property
    def overhead_bytes(self) -> int:
        return sum(d.overhead_bytes for d in self.devices)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices)


def kv_bytes_per_token(
    model: ModelInfo, type_k: KVCacheType, type_v: KVCacheType, *, flash_attention: bool = True
) -> int:
    """KV bytes of one cell over all layers that keep a cache (sliding-window ones included)."""
    return sum(_kv_bytes_per_layer_cell(model.layout, type_k, type_v, flash_attention=flash_attention))


def _kv_bytes_per_layer_cell(
    layout: CacheLayout, type_k: KVCacheType, type_v: KVCacheType, *, flash_attention: bool
) -> list[int]:
    """KV bytes of one cell in each layer, as ``llama_kv_cache``'s constructor lays them out."""
    # [TAG_V_CACHE_VARIABLE]: without flash attention V is stored transposed, and llama.cpp pads every
    # layer's V rows to the widest layer's (n_embd_v_gqa_max over all layers; a no-op when alike)
    widest_v = max((layer.v_elements for layer in layout.layers), default=0)
    sizes = []
    for layer in layout.layers:
        if not layer.in_kv_cache:
            sizes.append(0)
            continue
        v_elements = layer.v_elements
        if not flash_attention and not layout.is_mla:
            v_elements = widest_v
        v_bytes = 0 if layout.is_mla else row_size(type_v, v_elements)
        sizes.append(row_size(type_k, layer.k_elements) + v_bytes)
    return sizes


def context_refusal(model: ModelInfo, config: MemoryConfig) -> str | None:
    """Why llama.cpp would refuse to create this context (``llama_init_from_model``), or None.

    The runtime keeps V in f16 when the KV type is quantized without flash attention (llama.cpp
    refuses a quantized V cache then), so ``config.type_v`` already reflects that choice.
    """
    layout = model.layout
    type_k, type_v = config.type_k, config.type_v
    if layout.is_mla and type_k != type_v:
        return (
            f"llama.cpp refuses different K ({type_k.value}) and V ({type_v.value}) cache types for "
            f"multi-head latent attention ({model.architecture}); "
            + ("use an f16 KV cache" if config.flash_attention else "enable flash attention or use f16")
        )
    if config.flash_attention:
        for kind, cache_type, head in (("K", type_k, "head_k"), ("V", type_v, "head_v")):
            if not cache_type.is_quantized:
                continue
            sizes = sorted({getattr(layer, head) for layer in layout.layers if getattr(layer, head)})
            bad = [size for size in sizes if size % cache_type.block_size]
            if bad:
                return (
                    f"llama.cpp refuses a {cache_type.value} {kind} cache with flash attention: its block "
                    f"of {cache_type.block_size} does not divide the {kind} head size {bad[0]}"
                )
    for layer in layout.layers:
        if not layer.in_kv_cache:
            continue
        for cache_type, elements in ((type_k, layer.k_elements), (type_v, layer.v_elements)):
            if elements % cache_type.block_size:
                return (
                    f"a {cache_type.value} cache row needs a multiple of {cache_type.block_size} values, "
                    f"a layer of this model has {elements}"
                )
    return None


def layer_devices(block_count: int, gpu_layers: int, split: tuple[float, ...]) -> list[int]:
    """The device of each layer and of the output head (the last entry); -1 means the CPU.

    A copy of llama.cpp's ``llama_model::load_tensors`` rule: the offloaded block is the last
    ``gpu_layers`` of ``block_count + 1`` (the output head counts as a layer), and layer ``il`` goes to
    the first GPU whose cumulative split fraction exceeds ``(il - start) / offloaded``.
    """
    n_all = block_count + 1
    if gpu_layers < 0 or gpu_layers > n_all:
        gpu_layers = n_all
    if gpu_layers == 0 or not split:
        return [-1] * n_all
    total = sum(split)
    if total <= 0:
        raise ValueError("tensor split fractions must add up to more than zero")
    cumulative: list[float] = []
    running = 0.0
    for share in split:
        running += share
        cumulative.append(running / total)
    start = n_all - gpu_layers
    devices: list[int] = []
    for layer in range(n_all):
        if layer < start:
            devices.append(-1)
            continue
        position = (layer - start) / gpu_layers
        index = next((i for i, edge in enumerate(cumulative) if edge > position), len(split) - 1)
        devices.append(index)
    return devices


def compute_buffer_bytes(
    model: ModelInfo,
    n_kv: int,
    *,
    flash_attention: bool,
    n_ubatch: int = 512,
    with_output: bool = True,
    n_kv_swa: int | None = None,
    n_seqs: int = 1,
    type_k: KVCacheType = KVCacheType.F16,
    type_v: KVCacheType = KVCacheType.F16,
    pooling: int = 0,
) -> int:
    """Size of llama.cpp's compute (graph) buffer for a micro-batch of ``n_ubatch`` tokens.

    An architecture with a rule of its own (:func:`~.architectures.compute_rule`) uses it; the generic
    rule below fits llama-shaped graphs. ggml's allocator reuses memory, so the buffer is the
    high-water mark of the live tensors, plus the inputs that live for the whole graph. Measured on
    llama.cpp's CPU backend (see ``docs/memory-model.md``), per token of the micro-batch, in 4-byte
    floats:

    * the attention masks, alive through every layer: ``n_kv`` (f32), or ``n_kv / 2`` with flash
      attention (f16), and as much again for the sliding-window mask, plus the larger of two phases:
      - attention without flash attention: ``n_kv * n_head`` (the KQ matrix) ``+ 5 n_embd + 2 n_embd_kv``;
      - attention with flash attention: ``8 n_embd + 2 n_embd_kv``;
      - feed-forward: ``3 n_ff + 4 n_embd`` (gate, up and their product, next to the residual stream);
    * or, if larger, the output phase, when the masks are gone: ``n_vocab + n_embd`` (the logits of
      every token of the worst-case batch).

    ``n_kv`` is the cells one stream attends over: with the unified pool every slot's cells, since
    each token's mask row and scores span the whole stream (with per-slot streams the slot count
    does not enter). ``n_seqs`` is ``n_seq_max``: the reserved batch's tokens are rounded up to a
    multiple of it (:attr:`~.architectures.ComputeQuery.n_tokens`). ``pooling`` is an embedding
    context's (the replayed graphs add its few tensors; the generic rule's output phase, every
    token's logits, already dominates them).
    """
    layout = model.layout
    swa_cells = n_kv if n_kv_swa is None else n_kv_swa
    query = ComputeQuery(
        n_ubatch=n_ubatch,
        n_seqs=n_seqs,
        n_kv=n_kv,
        n_kv_swa=swa_cells,
        flash_attention=flash_attention,
        with_output=with_output,
        n_vocab=model.vocab_size,
        type_k=type_k.value,
        type_v=type_v.value,
        pooling=pooling,
    )
    rule = compute_rule(model.architecture)
    if rule is not None:
        return rule(model.hparams, layout, query)
    n_embd = model.embedding_length
    n_embd_kv = max((layer.k_elements for layer in layout.layers), default=0)
    # for mixture-of-experts models the routed experts' intermediate (n_ff_exp x experts used) is of
    # the same order as the dense n_ff the header gives, so n_ff stands for both
    n_ff = model.feed_forward_length or 4 * n_embd
    masks = n_kv + (swa_cells if layout.has_swa else 0)
    mask = masks / 2 if flash_attention else masks
    if flash_attention:
        attention = 8 * n_embd + 2 * n_embd_kv
    else:
        attention = n_kv * model.head_count + 5 * n_embd + 2 * n_embd_kv
    feed_forward = 3 * n_ff + 4 * n_embd
    layers = max(mask + attention, mask + feed_forward) * query.n_tokens
    output = model.vocab_size * query.n_outputs + n_embd * query.n_tokens if with_output else 0
    return int(max(layers, output) * 4)


def _gpu_compute_extra(layout: CacheLayout, config: MemoryConfig, cells: int) -> int:
    """What a CUDA graph holds beyond the CPU one: flash attention over a quantized KV cache.

    Measured on an H100 (bench/cuda_memory.py, 2026-11-26): with a q8_0 cache and flash attention
    the CUDA compute buffer grows by up to one layer's K and V of every stream converted to f16,
    ``cells x (n_embd_k + n_embd_v) x 2`` bytes (qwen3 at 4 x 4096: +7.5 MiB measured, 8 MiB here),
    while the CPU backend reads the quantized rows directly. Counted as that upper bound.
    """
    if not (config.flash_attention and config.type_k.is_quantized):
        return 0
    widest = max(
        (layer.k_elements + layer.v_elements for layer in layout.layers if layer.in_kv_cache), default=0
    )
    return cells * widest * 2


def estimate_memory(model: ModelInfo, config: MemoryConfig) -> MemoryEstimate:
    """Bytes per device for one replica running ``model`` with ``config``.

    Raises ``ValueError`` for settings llama.cpp refuses (see :func:`context_refusal`). The
    estimate's ``config`` is ``config`` resolved for the model (:meth:`MemoryConfig.for_model`): an
    embedding model's context, with its batch and sequence ids, when the model pools.
    """
    if config.num_ctx <= 0 or config.num_parallel <= 0:
        raise ValueError("num_ctx and num_parallel must be positive")
    config = config.for_model(model)
    embeddings = bool(config.embeddings)
    pooling = max(0, model.pooling_type or 0) if embeddings else 0
    layout = model.layout
    n_seq_max = config.sequences(layout)
    if not config.num_parallel <= n_seq_max <= MAX_SEQUENCE_IDS:
        raise ValueError(
            f"n_seq_max must be between the slots ({config.num_parallel}) and {MAX_SEQUENCE_IDS}, "
            f"got {n_seq_max}"
        )
    refusal = context_refusal(model, config)
    if refusal:
        raise ValueError(refusal)
    type_k, type_v = config.type_k, config.type_v
    n_ubatch = config.effective_n_ubatch
    unified = config.kv_unified
    streams = 1 if unified else n_seq_max
    cells = kv_cells_per_slot(config.num_ctx, config.num_parallel, unified=unified, n_seq_max=n_seq_max)
    swa_cells = swa_cells_per_slot(
        layout,
        config.num_ctx,
        config.num_parallel,
        n_ubatch=n_ubatch,
        swa_full=config.swa_full,
        unified=unified,
        n_seq_max=n_seq_max,
    )
    fa = config.flash_attention
    per_layer_cell = _kv_bytes_per_layer_cell(layout, type_k, type_v, flash_attention=fa)
    # recurrent state: one cell per sequence id (rs_size = max(1, n_seq_max)), unified or not (the
    # recurrent memory has no streams), f32 rows of n_embd_r and n_embd_s
    state_cells = max(1, n_seq_max)
    per_layer_state = [4 * (layer.r_elements + layer.s_elements) for layer in layout.layers]
    per_token = sum(
        size
        for size, layer in zip(per_layer_cell, layout.layers, strict=True)
        if config.swa_full or not layer.swa
    )

    gpu_count = config.gpu_count
    assignment = layer_devices(model.block_count, config.gpu_layers, config.tensor_split)
    names = [f"gpu{i}" for i in range(gpu_count)] or ["cpu"]
    devices = {name: DeviceMemory(device=name) for name in names}
    cpu = devices.get("cpu") or DeviceMemory(device="cpu")

    def device_for(index: int) -> DeviceMemory:
        return cpu if index < 0 else devices[f"gpu{index}"]

    for index, layer in enumerate(layout.layers):
        target = device_for(assignment[index])
        target.layers += 1
        target.weights_bytes += model.layer_bytes[index]
        layer_cells = swa_cells if layer.swa else cells
        target.kv_cache_bytes += per_layer_cell[index] * layer_cells * streams
        target.recurrent_bytes += per_layer_state[index] * state_cells
    output_device = device_for(assignment[-1])
    output_device.weights_bytes += model.output_bytes
    host_bytes = model.embedding_bytes
    if gpu_count == 0:
        cpu.weights_bytes += model.embedding_bytes
        host_bytes = 0

    for memory in devices.values():
        is_output = memory is output_device
        if memory.layers or is_output:
            memory.compute_bytes = _gpu_compute_extra(layout, config, cells * streams) if gpu_count else 0
            memory.compute_bytes += compute_buffer_bytes(
                model,
                cells,
                flash_attention=fa,
                n_ubatch=n_ubatch,
                with_output=is_output,
                n_kv_swa=swa_cells,
                n_seqs=n_seq_max,
                type_k=type_k,
                type_v=type_v,
                pooling=pooling,
            )
        memory.overhead_bytes = config.device_overhead_bytes if gpu_count else DEFAULT_CPU_OVERHEAD_BYTES
    outputs = output_buffer_bytes(
        model, n_seq_max, embeddings=embeddings, n_outputs=n_ubatch if embeddings else 0
    )
    if gpu_count:
        host_bytes += outputs
    else:
        cpu.output_bytes = outputs
    if gpu_count and cpu.layers:
        # partial offload: the CPU layers, their KV and state live in host memory next to the embeddings
        host_bytes += cpu.weights_bytes + cpu.kv_cache_bytes + cpu.recurrent_bytes
    return MemoryEstimate(
        config=config,
        devices=list(devices.values()),
        host_bytes=host_bytes,
        kv_cells_per_slot=cells,
        kv_bytes_per_token=per_token,
        swa_cells_per_slot=swa_cells,
        recurrent_bytes_per_slot=sum(per_layer_state),
        n_seq_max=n_seq_max,
        output_buffer_bytes=outputs,
    )

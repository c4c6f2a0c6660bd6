"""The memory model: how many bytes llama.cpp allocates for a model, a context and its slots.

This module is pure arithmetic over :class:`~parallama_runtime.model_info.ModelInfo`. It mirrors the
allocations llama.cpp makes when the runtime creates its context (``n_seq_max = slots``,
``kv_unified = false``, so every slot owns a KV region of ``num_ctx`` cells), and is checked against
llama.cpp's own buffer reports in ``tests/test_memory_vs_llama.py``:

* **weights**: the tensors' bytes, per layer, on the device that layer is assigned to, with
  llama.cpp's layer-to-device rule (``upper_bound`` over cumulative split fractions); the token
  embedding table always stays in host memory, the output head goes with the last layer.
* **KV cache**: per layer and cell, ``row_size(type_k, key_length * head_count_kv)`` plus
  ``row_size(type_v, value_length * head_count_kv)``; cells are ``num_ctx`` rounded up to 256 per slot
  (llama.cpp pads ``n_ctx`` and ``n_ctx_seq`` to 256). Quantized rows use ggml's block sizes.
* **compute**: the scheduler's graph buffer for the worst-case micro-batch. It is a high-water mark
  of ggml's allocator, so the formula is a fit of that mark's parts (see :func:`compute_buffer_bytes`).
* **overhead**: a fixed per-device amount (CUDA context, cuBLAS workspace), configurable.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .model_info import ModelInfo

__all__ = [
    "DEFAULT_CPU_OVERHEAD_BYTES",
    "DEFAULT_GPU_OVERHEAD_BYTES",
    "DeviceMemory",
    "KVCacheType",
    "MemoryConfig",
    "MemoryEstimate",
    "compute_buffer_bytes",
    "estimate_memory",
    "kv_bytes_per_token",
    "kv_cells_per_slot",
    "layer_devices",
    "row_size",
]

MiB = 1024 * 1024
DEFAULT_GPU_OVERHEAD_BYTES = 512 * MiB
"""CUDA context, cuBLAS workspace and driver allocations: 300 to 500 MiB on current GPUs."""
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


def row_size(kind: KVCacheType, elements: int) -> int:
    """ggml_row_size: bytes of one row of ``elements`` values stored as ``kind``."""
    block, size = _BLOCKS[kind]
    if elements % block:
        raise ValueError(f"{kind} rows need a multiple of {block} elements, got {elements}")
    return elements // block * size


def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def kv_cells_per_slot(num_ctx: int, num_parallel: int) -> int:
    """Cells llama.cpp allocates per sequence for ``n_ctx = num_ctx * num_parallel`` (non-unified)."""
    n_ctx = _pad(num_ctx * num_parallel, _CELL_PADDING)
    return _pad(n_ctx // num_parallel, _CELL_PADDING)


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
    compute_bytes: int = 0
    overhead_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes


@dataclass
class MemoryEstimate:
    """Per-device bytes of one replica, plus what the host keeps (the embedding table)."""

    config: MemoryConfig
    devices: list[DeviceMemory]
    host_bytes: int
    kv_cells_per_slot: int
    kv_bytes_per_token: int

    @property
    def weights_bytes(self) -> int:
        return sum(d.weights_bytes for d in self.devices)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(d.kv_cache_bytes for d in self.devices)

    @property
    def kv_bytes_per_slot(self) -> int:
        return self.kv_bytes_per_token * self.kv_cells_per_slot

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
    """KV bytes one token (one cell) costs over all layers."""
    return sum(_kv_bytes_per_layer_cell(model, type_k, type_v, flash_attention=flash_attention))


def _kv_bytes_per_layer_cell(
    model: ModelInfo, type_k: KVCacheType, type_v: KVCacheType, *, flash_attention: bool
) -> list[int]:
    """KV bytes of one cell in each layer, as llama.cpp lays them out."""
    widest_v = max(model.v_elements(layer) for layer in range(model.block_count))
    sizes = []
    for layer in range(model.block_count):
        k_elements = model.k_elements(layer)
        if k_elements == 0:  # llama.cpp gives a layer without KV heads no cache at all
            sizes.append(0)
            continue
        v_elements = model.v_elements(layer)
        if not flash_attention and v_elements:
            # without flash attention V is stored transposed, and llama.cpp pads every layer's V rows
            # to the widest layer's (its TAG_V_CACHE_VARIABLE); a no-op when all layers are alike
            v_elements = widest_v
        sizes.append(row_size(type_k, k_elements) + row_size(type_v, v_elements))
    return sizes


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
) -> int:
    """Size of llama.cpp's compute (graph) buffer for a micro-batch of ``n_ubatch`` tokens.

    ggml's allocator reuses memory, so the buffer is the high-water mark of the live tensors, plus
    the inputs that live for the whole graph. Measured on llama.cpp's CPU backend (see
    ``docs/memory-model.md``), per token of the micro-batch, in 4-byte floats:

    * the attention mask, alive through every layer: ``n_kv`` (f32), or ``n_kv / 2`` with flash
      attention (f16), plus the larger of two per-layer phases:
      - attention without flash attention: ``n_kv * n_head`` (the KQ matrix) ``+ 5 n_embd + 2 n_embd_kv``;
      - attention with flash attention: ``8 n_embd + 2 n_embd_kv``;
      - feed-forward: ``3 n_ff + 4 n_embd`` (gate, up and their product, next to the residual stream);
    * or, if larger, the output phase, when the mask is gone: ``n_vocab + n_embd`` (the logits of
      every token of the worst-case batch).

    ``n_kv`` is the cells one slot attends over (streams are per slot, so the slot count does not
    enter). The fit is within a few percent for llama-shaped models (n_ff around 3 n_embd).
    """
    n_embd = model.embedding_length
    n_embd_kv = max(model.k_elements(layer) for layer in range(model.block_count))
    # for mixture-of-experts models the routed experts' intermediate (n_ff_exp x experts used) is of
    # the same order as the dense n_ff the header gives, so n_ff stands for both
    n_ff = model.feed_forward_length or 4 * n_embd
    mask = n_kv / 2 if flash_attention else n_kv
    if flash_attention:
        attention = 8 * n_embd + 2 * n_embd_kv
    else:
        attention = n_kv * model.head_count + 5 * n_embd + 2 * n_embd_kv
    feed_forward = 3 * n_ff + 4 * n_embd
    output = model.vocab_size + n_embd if with_output else 0
    floats_per_token = max(mask + attention, mask + feed_forward, output)
    return int(floats_per_token * 4 * n_ubatch)


def estimate_memory(model: ModelInfo, config: MemoryConfig) -> MemoryEstimate:
    """Bytes per device for one replica running ``model`` with ``config``."""
    if config.num_ctx <= 0 or config.num_parallel <= 0:
        raise ValueError("num_ctx and num_parallel must be positive")
    type_k, type_v = config.type_k, config.type_v
    cells = kv_cells_per_slot(config.num_ctx, config.num_parallel)
    fa = config.flash_attention
    per_layer_cell = _kv_bytes_per_layer_cell(model, type_k, type_v, flash_attention=fa)
    per_token = sum(per_layer_cell)
    n_ubatch = min(config.n_ubatch, cells * config.num_parallel)

    gpu_count = config.gpu_count
    assignment = layer_devices(model.block_count, config.gpu_layers, config.tensor_split)
    names = [f"gpu{i}" for i in range(gpu_count)] or ["cpu"]
    devices = {name: DeviceMemory(device=name) for name in names}
    cpu = devices.get("cpu") or DeviceMemory(device="cpu")

    def device_for(index: int) -> DeviceMemory:
        return cpu if index < 0 else devices[f"gpu{index}"]

    for layer in range(model.block_count):
        target = device_for(assignment[layer])
        target.layers += 1
        target.weights_bytes += model.layer_bytes[layer]
        target.kv_cache_bytes += per_layer_cell[layer] * cells * config.num_parallel
    output_device = device_for(assignment[-1])
    output_device.weights_bytes += model.output_bytes
    host_bytes = model.embedding_bytes
    if gpu_count == 0:
        cpu.weights_bytes += model.embedding_bytes
        host_bytes = 0

    for memory in devices.values():
        is_output = memory is output_device
        if memory.layers or is_output:
            memory.compute_bytes = compute_buffer_bytes(
                model,
                cells,
                flash_attention=config.flash_attention,
                n_ubatch=n_ubatch,
                with_output=is_output,
            )
        memory.overhead_bytes = config.device_overhead_bytes if gpu_count else DEFAULT_CPU_OVERHEAD_BYTES
    if gpu_count and cpu.layers:
        # partial offload: the CPU layers and their KV live in host memory next to the embeddings
        host_bytes += cpu.weights_bytes + cpu.kv_cache_bytes
    return MemoryEstimate(
        config=config,
        devices=list(devices.values()),
        host_bytes=host_bytes,
        kv_cells_per_slot=cells,
        kv_bytes_per_token=per_token,
    )

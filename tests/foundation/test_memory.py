"""The memory model's arithmetic, against numbers published for real models and llama.cpp's rules."""

from __future__ import annotations

import pytest
from parallama_runtime.planning.memory import (
    KVCacheType,
    MemoryConfig,
    estimate_memory,
    kv_bytes_per_token,
    kv_cells_per_slot,
    layer_devices,
    row_size,
)
from parallama_runtime.planning.model_info import model_info_from_metadata
from parallama_runtime.planning.presets import PRESETS

LLAMA_8B = model_info_from_metadata(PRESETS["llama-3.1-8b"])


def test_llama_8b_bytes_per_token() -> None:
    # 32 layers x 8 KV heads x 128 dims, K and V
    assert kv_bytes_per_token(LLAMA_8B, KVCacheType.F16, KVCacheType.F16) == 131072
    assert kv_bytes_per_token(LLAMA_8B, KVCacheType.Q8_0, KVCacheType.Q8_0) == 69632
    assert kv_bytes_per_token(LLAMA_8B, KVCacheType.Q4_0, KVCacheType.Q4_0) == 32 * 2 * 1024 // 32 * 18


def test_row_sizes_follow_ggml_blocks() -> None:
    assert row_size(KVCacheType.F16, 1024) == 2048
    assert row_size(KVCacheType.Q8_0, 1024) == 32 * 34
    assert row_size(KVCacheType.Q4_0, 64) == 2 * 18
    with pytest.raises(ValueError, match="multiple of 32"):
        row_size(KVCacheType.Q8_0, 48)


@pytest.mark.parametrize(
    ("num_ctx", "slots", "cells"),
    [(4096, 4, 4096), (4000, 1, 4096), (1000, 3, 1024), (100, 2, 256), (2048, 5, 2048)],
)
def test_cells_are_padded_like_llama_cpp(num_ctx: int, slots: int, cells: int) -> None:
    assert kv_cells_per_slot(num_ctx, slots) == cells


def test_quantized_v_needs_flash_attention() -> None:
    with_fa = MemoryConfig(kv_cache_type=KVCacheType.Q8_0, flash_attention=True)
    without = MemoryConfig(kv_cache_type=KVCacheType.Q8_0, flash_attention=False)
    assert (with_fa.type_k, with_fa.type_v) == (KVCacheType.Q8_0, KVCacheType.Q8_0)
    assert (without.type_k, without.type_v) == (KVCacheType.Q8_0, KVCacheType.F16)


def test_kv_memory_is_num_ctx_times_slots() -> None:
    one = estimate_memory(LLAMA_8B, MemoryConfig(num_ctx=4096, num_parallel=1))
    four = estimate_memory(LLAMA_8B, MemoryConfig(num_ctx=4096, num_parallel=4))
    assert one.kv_cache_bytes == 4096 * 131072
    assert four.kv_cache_bytes == 4 * one.kv_cache_bytes
    assert four.weights_bytes == one.weights_bytes


def test_layer_assignment_matches_llama_cpp_rule() -> None:
    # 4 layers + output over two equal GPUs: upper_bound over [0.5, 1.0] of il/5
    assert layer_devices(4, -1, (1.0, 1.0)) == [0, 0, 0, 1, 1]
    # partial offload of 2 of the 5: the first three stay on the CPU
    assert layer_devices(4, 2, (1.0,)) == [-1, -1, -1, 0, 0]
    assert layer_devices(4, 0, (1.0,)) == [-1] * 5
    # a 3:1 split
    assert layer_devices(7, -1, (3.0, 1.0)) == [0, 0, 0, 0, 0, 0, 1, 1]


def test_multi_gpu_split_keeps_totals_and_puts_the_output_head_last() -> None:
    single = estimate_memory(LLAMA_8B, MemoryConfig(num_parallel=2))
    split = estimate_memory(LLAMA_8B, MemoryConfig(num_parallel=2, tensor_split=(1.0, 1.0)))
    assert [d.device for d in split.devices] == ["gpu0", "gpu1"]
    assert split.weights_bytes == single.weights_bytes
    assert split.kv_cache_bytes == single.kv_cache_bytes
    assert sum(d.layers for d in split.devices) == 32
    # the logits buffer (vocab x ubatch floats) makes the last GPU's compute buffer the larger one
    assert split.devices[1].compute_bytes > split.devices[0].compute_bytes
    assert all(d.overhead_bytes > 0 for d in split.devices)


def test_cpu_run_holds_everything_in_one_place() -> None:
    est = estimate_memory(LLAMA_8B, MemoryConfig(gpu_layers=0))
    assert [d.device for d in est.devices] == ["cpu"]
    assert est.weights_bytes == LLAMA_8B.size_bytes
    assert est.host_bytes == 0


def test_layers_with_different_kv_heads() -> None:
    """Per-layer KV heads (deci, as Nemotron-NAS files): llama.cpp keeps every layer in its cache, a
    layer without KV heads too; without flash attention it stores V transposed and pads every
    layer's V rows to the widest layer's, so the head-less layer costs a full-width V row
    (tests/memory checks this against llama.cpp with a generated deci model)."""
    model = model_info_from_metadata(
        {
            "architecture": "deci",
            "block_count": 3,
            "embedding_length": 512,
            "head_count": 8,
            "head_count_kv": [4, 2, 0],
            "key_length": 64,
            "value_length": 64,
            "context_length": 2048,
            "size_bytes": 10_000_000,
        }
    )
    f16 = KVCacheType.F16
    with_fa = kv_bytes_per_token(model, f16, f16, flash_attention=True)
    without = kv_bytes_per_token(model, f16, f16, flash_attention=False)
    assert with_fa == 2 * (256 + 256) + 2 * (128 + 128)
    assert without == 2 * (256 + 256) + 2 * (128 + 256) + 2 * (0 + 256)
    estimate = estimate_memory(model, MemoryConfig(num_ctx=256, flash_attention=False))
    assert estimate.kv_cache_bytes == without * 256

"""The memory model against llama.cpp for multi-head latent attention and pure recurrent models.

Every family is a tiny random-weight GGUF (``tests/support/families/mla_recurrent.py``); llama.cpp
creates its context exactly as the runtime does (``memory/harness.py``: one unified KV pool of
``num_ctx x slots`` cells), and also with a KV stream per slot (without ``kv_unified``) and with more
sequence ids than slots, and the plan must agree:

* DeepSeek-2 (the MLA conversion, the older one, one with a NextN layer, and mistral4): the KV cache's
  cells and layers, its size at llama.cpp's printed precision, one cell's bytes to the byte (from a
  sequence's saved state), no V cache with MLA, and the same refusals: llama.cpp refuses MLA with K
  and V types that differ, which is what the runtime asks for with a quantized cache and no flash
  attention (it keeps V in f16 then);
* Mamba, Mamba-2, RWKV-6/7 and their Qwen2 variants: one state cell per sequence id, the R and S
  rows of every layer to the byte (parsed from ``llama_memory_recurrent::state_write``'s output) and
  at the printed precision, and nothing that depends on ``num_ctx``;
* the CPU compute buffer within 10 % over num_ctx 512/2048, 1/2/4 slots, flash attention on and
  off, unified or not, and with 16 or 20 sequence ids for 4 slots;
* the output (logits) buffer at the printed precision.

Plus the per-token KV bytes of DeepSeek-R1's shape in both conversions, from its metadata alone.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import struct
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="the runtime extra (llama-cpp-python) is not installed")

from memory.harness import (  # noqa: E402
    COMPUTE_TOLERANCE,
    PRINTED,
    MiB,
    Setting,
    capture,
    load,
    measure,
    measure_setting,
)
from parallama_runtime.planning.memory import (  # noqa: E402
    KVCacheType,
    MemoryConfig,
    context_refusal,
    estimate_memory,
    kv_bytes_per_token,
)
from parallama_runtime.planning.model_info import ModelInfo, model_info_from_gguf, model_info_from_metadata  # noqa: E402
from support.families import FAMILIES, load_all  # noqa: E402

pytestmark = pytest.mark.llama


MLA = ("deepseek2-mla", "deepseek2-legacy", "deepseek2-mla-nextn", "mistral4-mla")
RECURRENT = ("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7")

load_all()


_KV_BASE = (
    Setting(512, 1, KVCacheType.F16, True),
    Setting(2048, 2, KVCacheType.F16, False),
    Setting(512, 4, KVCacheType.Q8_0, True),
    Setting(768, 2, KVCacheType.Q4_0, True),
    Setting(512, 1, KVCacheType.Q8_0, False),  # MLA: K q8_0 with V f16, refused by llama.cpp
    Setting(512, 2, KVCacheType.F32, False),
)
KV_SETTINGS = (
    *_KV_BASE,
    *(Setting(s.num_ctx, s.slots, s.kv, s.flash_attention, unified=False) for s in _KV_BASE),
    Setting(2048, 4, KVCacheType.F16, False, n_seq_max=16),
    Setting(2048, 4, KVCacheType.Q8_0, True, n_seq_max=20),
)

COMPUTE_SETTINGS = tuple(
    Setting(ctx, slots, KVCacheType.F16, fa, unified=unified)
    for unified, ctx, slots, fa in itertools.product((True, False), (512, 2048), (1, 2, 4), (True, False))
) + tuple(
    Setting(ctx, 4, KVCacheType.F16, fa, n_seq_max=ids)
    for ctx, fa, ids in itertools.product((512, 2048), (True, False), (16, 20))
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("mla_recurrent")
    return {name: FAMILIES[name].write(directory / f"{name}.gguf") for name in MLA + RECURRENT}


@functools.cache
def info(path: Path) -> ModelInfo:
    return model_info_from_gguf(path)


# ---------------------------------------------------------------------------------------------------
# DeepSeek-2: KV cache and refusals
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", KV_SETTINGS, ids=str)
@pytest.mark.parametrize("name", MLA)
def test_mla_kv_cache_to_the_byte(models: dict[str, Path], name: str, setting: Setting) -> None:
    model = info(models[name])
    config = setting.config()
    measured = measure_setting(models[name], setting, state=True)
    refusal = context_refusal(model, config)
    assert (measured.refused is None) == (refusal is None), (measured.refused, refusal)
    if refusal is not None:
        assert model.layout.is_mla and "different K" in (measured.refused or "")
        return
    estimate = estimate_memory(model, config)
    (kv,) = measured.reports.kv_caches
    assert kv.cells == estimate.kv_cells_per_slot
    assert kv.seqs == (1 if setting.unified else setting.sequences)  # streams
    assert kv.layers == sum(layer.in_kv_cache for layer in model.layout.layers)
    assert measured.kv_cell_bytes == estimate.kv_bytes_per_token
    assert abs(estimate.kv_cache_bytes / MiB - kv.mib) <= PRINTED
    assert kv.type_k == config.type_k.value and kv.type_v == config.type_v.value
    assert abs(measured.output_mib - estimate.output_buffer_bytes / MiB) <= PRINTED
    if model.layout.is_mla:
        assert kv.v_mib == 0  # V is a view of K
        assert model.layout.notes == ()
    else:
        assert any("predates" in note for note in model.layout.notes)


def test_mla_is_decided_from_the_metadata_as_llama_cpp_does(models: dict[str, Path]) -> None:
    mla, legacy, nextn = (
        info(models[name]) for name in ("deepseek2-mla", "deepseek2-legacy", "deepseek2-mla-nextn")
    )
    assert mla.layout.is_mla and not legacy.layout.is_mla
    # one K row of kv_lora_rank + rope (64 + 32) per layer, against 4 heads of K (32 + 32) and V (32)
    assert [layer.k_elements for layer in mla.layout.layers] == [96] * 3
    assert {(layer.head_k, layer.head_v) for layer in mla.layout.layers} == {(96, 64)}
    assert [(layer.k_elements, layer.v_elements) for layer in legacy.layout.layers] == [(256, 128)] * 3
    # the NextN layer counted in block_count is not cached by the main context
    assert [layer.in_kv_cache for layer in nextn.layout.layers] == [True, True, True, False]


R1 = {
    "architecture": "deepseek2",
    "block_count": 61,
    "embedding_length": 7168,
    "head_count": 128,
    "context_length": 163840,
    "size_bytes": 61 * 2**30,
    "feed_forward_length": 18432,
    "vocab_size": 129280,
}
R1_KEYS = {
    "attention.q_lora_rank": 1536,
    "attention.kv_lora_rank": 512,
    "rope.dimension_count": 64,
    "leading_dense_block_count": 3,
    "expert_feed_forward_length": 2048,
    "expert_count": 256,
    "expert_used_count": 8,
    "expert_shared_count": 1,
}
R1_LEGACY = {"attention.head_count_kv": 128, "attention.key_length": 192, "attention.value_length": 128}
R1_MLA = {
    "attention.head_count_kv": 1,
    "attention.key_length": 576,
    "attention.value_length": 512,
    "attention.key_length_mla": 192,
    "attention.value_length_mla": 128,
}


def test_deepseek_r1_bytes_per_token() -> None:
    """61 layers of 128 heads: K 192 and V 128 per head in the older conversion, one 576-wide latent
    row in the MLA conversion (57 times less)."""
    legacy = model_info_from_metadata({**R1, "gguf": {**R1_KEYS, **R1_LEGACY}})
    mla = model_info_from_metadata({**R1, "gguf": {**R1_KEYS, **R1_MLA}})
    f16 = KVCacheType.F16
    assert kv_bytes_per_token(legacy, f16, f16) == 61 * (128 * 192 + 128 * 128) * 2 == 4_997_120
    assert kv_bytes_per_token(mla, f16, f16) == 61 * 576 * 2 == 70_272
    q8 = KVCacheType.Q8_0
    assert kv_bytes_per_token(mla, q8, q8) == 61 * 576 // 32 * 34
    # the runtime's q8_0 without flash attention keeps V in f16: llama.cpp refuses that for MLA only
    config = MemoryConfig(num_ctx=4096, kv_cache_type=q8, flash_attention=False, gpu_layers=0)
    assert context_refusal(mla, config) is not None
    assert context_refusal(legacy, config) is None
    assert context_refusal(mla, MemoryConfig(num_ctx=4096, kv_cache_type=q8, gpu_layers=0)) is None


# ---------------------------------------------------------------------------------------------------
# Recurrent state
# ---------------------------------------------------------------------------------------------------


def recurrent_rows(
    path: Path, *, num_ctx: int, slots: int, unified: bool = True
) -> tuple[list[tuple[int, int]], int]:
    """The R and S row bytes of every layer, and the cell count, read from a sequence's saved state.

    ``llama_context::state_seq_get_data`` writes a magic and the sequence id, then
    ``llama_memory_recurrent::state_write``: the cell count, per cell its position and a sequence count
    (0 for a single sequence), ``s_trans`` and the layer count, then for every layer the R type (i32),
    the R row size (u64, ``ggml_row_size``) and the rows, then the same for S.
    """
    loaded = load(path)
    capture()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = num_ctx * slots
    params.n_seq_max = slots
    params.n_batch = params.n_ubatch = 512
    params.kv_unified = unified
    params.n_threads = params.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(loaded.model, params)
    assert ctx, "llama.cpp refused the context"
    try:
        tokens = (llama_cpp.llama_token * 1)(3)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 1)) == 0
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0) == size
    finally:
        llama_cpp.llama_free(ctx)
    data = bytes(buffer)
    offset = 8  # io_magic, seq_id
    (cells,) = struct.unpack_from("<I", data, offset)
    offset += 4 + cells * 8  # (pos, n_seq_id = 0) per cell
    s_trans, n_layer = struct.unpack_from("<II", data, offset)
    offset += 8
    assert s_trans == 0
    rows: list[list[int]] = [[], []]
    for kind in range(2):
        for _ in range(n_layer):
            _type, row = struct.unpack_from("<iQ", data, offset)
            rows[kind].append(row)
            offset += 12 + row * cells
    assert offset == size, "the saved state has more than the recurrent rows"
    return list(zip(rows[0], rows[1], strict=True)), cells


@pytest.mark.parametrize(
    "setting",
    [
        Setting(512, 1, KVCacheType.F16, True),
        Setting(512, 4, KVCacheType.F16, True),
        Setting(512, 4, KVCacheType.F16, True, unified=False),
        Setting(512, 2, KVCacheType.F16, True, n_seq_max=6),
    ],
    ids=str,
)
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_state_to_the_byte(models: dict[str, Path], name: str, setting: Setting) -> None:
    """One state per sequence id (rs_size = n_seq_max), unified pool or not: the reason the runtime
    gives recurrent models no more sequence ids than slots."""
    model = info(models[name])
    layers = [layer for layer in model.layout.layers if layer.is_recurrent]
    assert not model.layout.has_attention
    rows, cells = recurrent_rows(models[name], num_ctx=512, slots=setting.slots, unified=setting.unified)
    assert cells == 1  # the one sequence that decoded
    assert rows == [(4 * layer.r_elements, 4 * layer.s_elements) for layer in layers]

    estimate = estimate_memory(model, setting.config())
    measured = measure_setting(models[name], setting, state=True)
    state = measured.reports.recurrent
    assert state is not None and not measured.reports.kv_caches
    assert state.cells == setting.sequences and state.layers == len(layers)
    assert abs(sum(4 * layer.r_elements for layer in layers) * state.cells / MiB - state.r_mib) <= PRINTED
    assert abs(sum(4 * layer.s_elements for layer in layers) * state.cells / MiB - state.s_mib) <= PRINTED
    assert (
        estimate.recurrent_bytes
        == sum(4 * (layer.r_elements + layer.s_elements) for layer in layers) * state.cells
    )
    assert estimate.kv_cache_bytes == 0
    # the saved size alone: magic, seq id, cell count, one cell, s_trans, n_layer, then per layer a
    # type and a row size before each of R and S
    assert measured.seq_state_bytes == 28 + sum(
        24 + 4 * (layer.r_elements + layer.s_elements) for layer in layers
    )


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_memory_ignores_num_ctx(models: dict[str, Path], name: str) -> None:
    """rs_size is max(1, n_seq_max): the context size changes neither the state nor the graph."""
    small, large = (measure(models[name], num_ctx=ctx, slots=2, state=False) for ctx in (256, 4096))
    assert small.reports.recurrent == large.reports.recurrent
    assert small.compute_mib == large.compute_mib
    model = info(models[name])
    plans = [estimate_memory(model, Setting(ctx, 2, KVCacheType.F16, True).config()) for ctx in (256, 4096)]
    assert plans[0].recurrent_bytes == plans[1].recurrent_bytes
    assert plans[0].compute_bytes == plans[1].compute_bytes


# ---------------------------------------------------------------------------------------------------
# Compute buffer
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MLA + RECURRENT)
def test_compute_buffer_within_tolerance(models: dict[str, Path], name: str) -> None:
    model = info(models[name])
    misses = []
    for setting in COMPUTE_SETTINGS:
        measured = measure_setting(models[name], setting)
        assert measured.refused is None, measured.refused
        planned = estimate_memory(model, setting.config()).compute_bytes / MiB
        if abs(planned / measured.compute_mib - 1) > COMPUTE_TOLERANCE:
            misses.append(f"{setting}: planned {planned:.2f} MiB, llama.cpp {measured.compute_mib:.2f} MiB")
    assert not misses, "\n".join(misses)

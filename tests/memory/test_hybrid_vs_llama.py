"""The memory model against llama.cpp for hybrid models: attention layers mixed with recurrent ones.

Every family in :data:`HYBRID` is a tiny random-weight GGUF (``tests/support/families/hybrid.py``);
llama.cpp creates its context exactly as the runtime does (``memory/harness.py``: one unified KV pool
of ``num_ctx x slots`` cells, a sequence id per slot) over a matrix of context sizes, slot counts,
cache types and flash attention, and again with a KV stream per slot (llama.cpp without
``kv_unified``) and with more sequence ids than slots; the plan must agree:

* the KV caches: their cell counts and layer counts (which layers ``create_memory``'s ``filter_attn``
  keeps), their sizes at llama.cpp's printed precision, and one cell's bytes to the byte;
* the recurrent state: its cell count (one per sequence id), the R (conv) and S (SSM) sizes at the printed
  precision, and to the byte through a sequence's saved state, whose layout mirrors
  ``llama_memory_hybrid::state_write`` (the KV cache's cells, then the recurrent cell's R and S rows
  of every layer ``filter_recr`` keeps);
* the compute buffer within 10 %;
* the same refusals (a q8_0 K cache with flash attention and 16-wide heads).

Plus the rules these files cannot reach, against the llama.cpp source they mirror, and the per-slot
state of a real model's shape (Granite-4.0-H-Small).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="the runtime extra (llama-cpp-python) is not installed")

from memory.harness import COMPUTE_TOLERANCE, PRINTED, Measured, MiB, Setting, measure_setting  # noqa: E402
from parallama_runtime.planning.architectures import CacheLayout, Hparams, cache_layout  # noqa: E402
from parallama_runtime.planning.errors import UnsupportedModelError  # noqa: E402
from parallama_runtime.planning.memory import (  # noqa: E402
    KVCacheType,
    context_refusal,
    estimate_memory,
    row_size,
)
from parallama_runtime.planning.model_info import ModelInfo, model_info_from_gguf  # noqa: E402
from support.families import FAMILIES, load_all  # noqa: E402
from support.families.hybrid import (  # noqa: E402
    Dims,
    write_falcon_h1,
    write_granitehybrid,
    write_jamba,
    write_lfm2,
    write_nemotron_h,
    write_qwen3next,
)

pytestmark = pytest.mark.llama


HYBRID = ("jamba", "granitehybrid", "falcon-h1", "nemotron_h", "qwen3next", "lfm2", "lfm2-swa")

load_all()


SETTINGS = [
    Setting(num_ctx, slots, kv, fa, unified=unified)
    for unified, num_ctx, slots, (kv, fa) in itertools.product(
        (True, False),
        (512, 2048),
        (1, 4),
        [(KVCacheType.F16, False), (KVCacheType.F16, True), (KVCacheType.Q8_0, True)],
    )
] + [
    # the runtime gives these models one sequence id per slot (every id keeps a recurrent state); what
    # more ids would cost must still be what llama.cpp allocates
    Setting(2048, 2, kv, fa, n_seq_max=ids)
    for (kv, fa), ids in itertools.product([(KVCacheType.F16, False), (KVCacheType.F16, True)], (8, 20))
]
CASES = [pytest.param(name, setting, id=f"{name}-{setting}") for name in HYBRID for setting in SETTINGS]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ModelInfo]]:
    """Each family's file and the planner's view of it, written once for the module."""
    directory = tmp_path_factory.mktemp("hybrid")
    written = {}
    for name in HYBRID:
        path = FAMILIES[name].write(directory / f"{name}.gguf")
        written[name] = (path, model_info_from_gguf(path))
    return written


def _measure(path: Path, setting: Setting, *, state: bool = True) -> Measured:
    return measure_setting(path, setting, state=state)


def _streams(setting: Setting) -> int:
    return 1 if setting.unified else setting.sequences


def _caches(layout: CacheLayout) -> list[list[Any]]:
    """The layers of each KV cache: the full cache, then (``llama_kv_cache_iswa``) the sliding one."""
    kv = [layer for layer in layout.layers if layer.in_kv_cache]
    if not layout.has_swa:
        return [kv]
    return [[layer for layer in kv if not layer.swa], [layer for layer in kv if layer.swa]]


def _planned_kv(layout: CacheLayout, setting: Setting, cells: list[int]) -> list[dict[str, int]]:
    """Per cache, its layers and its K and V bytes, by ``llama_kv_cache``'s constructor (V rows padded
    to the widest layer's over every layer when V is transposed, without flash attention)."""
    config = setting.config()
    widest_v = max(layer.v_elements for layer in layout.layers)
    planned = []
    for layers, n_cells in zip(_caches(layout), cells, strict=True):
        k = sum(row_size(config.type_k, layer.k_elements) for layer in layers)
        v = sum(
            row_size(config.type_v, layer.v_elements if setting.flash_attention else widest_v)
            for layer in layers
        )
        streams = _streams(setting)
        planned.append({"layers": len(layers), "k": k * n_cells * streams, "v": v * n_cells * streams})
    return planned


def _saved_state_bytes(layout: CacheLayout, setting: Setting, tokens: int) -> int:
    """``llama_state_seq_get_size`` of slot 0 holding ``tokens`` tokens, field by field.

    ``llama_context::state_seq_get_size`` writes a magic and the sequence id, then the memory's
    ``state_write``: for a hybrid model the attention part, then the recurrent part.

    * ``llama_kv_cache::state_write`` (once per cache; base then sliding with a window): the stream
      count (one in the unified pool), a cell count per stream (only sequence 0's stream holds its
      cells); per cell its
      position, its sequence count and the sequence; then ``v_trans`` and the layer count, and per
      layer a K header (type, row size) and K rows, then a V header (type and row size; or type, element
      size and width when transposed: 12 bytes either way) and the V values, unpadded.
    * ``llama_memory_recurrent::state_write``: the cell count (the sequence's one cell), its position and
      a zero sequence count, ``s_trans`` and the layer count; per recurrent layer an R header and R row
      (f32 ``n_embd_r``), then per recurrent layer an S header and S row (f32 ``n_embd_s``).
    """
    config = setting.config()
    total = 4 + 4
    for layers in _caches(layout):
        total += 4 + 4 * _streams(setting) + tokens * 12 + 4 + 4
        for layer in layers:
            total += 12 + row_size(config.type_k, layer.k_elements) * tokens
            total += 12 + row_size(config.type_v, layer.v_elements) * tokens
    recurrent = [layer for layer in layout.layers if layer.is_recurrent]
    total += 4 + 8 + 4 + 4
    total += sum(12 + 4 * layer.r_elements + 12 + 4 * layer.s_elements for layer in recurrent)
    return total


@pytest.mark.parametrize(("name", "setting"), CASES)
def test_plan_matches_llama_cpp(
    models: dict[str, tuple[Path, ModelInfo]], name: str, setting: Setting
) -> None:
    path, info = models[name]
    config = setting.config()
    refusal = context_refusal(info, config)
    measured = _measure(path, setting)
    assert (refusal is None) == (measured.refused is None), (
        f"plan: {refusal!r}; llama.cpp: {measured.refused!r}"
    )
    if refusal is not None:
        return
    estimate = estimate_memory(info, config)
    layout = info.layout

    # KV caches: cells, streams, layers, sizes, and one cell to the byte
    caches = measured.reports.kv_caches
    cells = [estimate.kv_cells_per_slot] + ([estimate.swa_cells_per_slot] if layout.has_swa else [])
    assert [cache.cells for cache in caches] == cells
    assert {cache.seqs for cache in caches} == {_streams(setting)}
    planned = _planned_kv(layout, setting, cells)
    for cache, plan in zip(caches, planned, strict=True):
        assert cache.layers == plan["layers"]
        assert abs(cache.k_mib - plan["k"] / MiB) <= PRINTED, (cache, plan)
        assert abs(cache.v_mib - plan["v"] / MiB) <= PRINTED, (cache, plan)
    assert estimate.kv_cache_bytes == sum(plan["k"] + plan["v"] for plan in planned)
    one_cell = sum(
        12
        + sum(
            row_size(config.type_k, layer.k_elements) + row_size(config.type_v, layer.v_elements)
            for layer in c
        )
        for c in _caches(layout)
    )
    assert measured.kv_cell_bytes == one_cell - 12  # the harness subtracts one cell's metadata

    # recurrent state: one cell per sequence id, R and S rows of every recurrent layer, to the byte
    recurrent = measured.reports.recurrent
    assert recurrent is not None
    assert recurrent.cells == setting.sequences
    rows = [layer for layer in layout.layers if layer.is_recurrent]
    r_bytes = sum(4 * layer.r_elements for layer in rows) * recurrent.cells
    s_bytes = sum(4 * layer.s_elements for layer in rows) * recurrent.cells
    assert abs(recurrent.r_mib - r_bytes / MiB) <= PRINTED
    assert abs(recurrent.s_mib - s_bytes / MiB) <= PRINTED
    assert estimate.recurrent_bytes == r_bytes + s_bytes
    assert measured.seq_state_bytes == _saved_state_bytes(layout, setting, tokens=1)

    assert abs(measured.output_mib - estimate.output_buffer_bytes / MiB) <= PRINTED

    ratio = estimate.compute_bytes / (measured.compute_mib * MiB)
    assert abs(ratio - 1) <= COMPUTE_TOLERANCE, f"compute: planned/llama.cpp = {ratio:.3f}"


NARROW = Dims(n_head=8)  # 16-wide heads: a q8_0 block (32) does not divide them
NARROW_WRITERS = {
    "jamba": write_jamba,
    "granitehybrid": write_granitehybrid,
    "falcon-h1": write_falcon_h1,
    "nemotron_h": write_nemotron_h,
    "qwen3next": write_qwen3next,
    "lfm2": write_lfm2,
}


@pytest.mark.parametrize("arch", sorted(NARROW_WRITERS))
def test_quantized_k_refused_for_narrow_heads(tmp_path: Path, arch: str) -> None:
    """llama.cpp checks the head size of every trunk layer, recurrent ones included; f16 is accepted."""
    path = NARROW_WRITERS[arch](tmp_path / f"{arch}-narrow.gguf", NARROW)
    info = model_info_from_gguf(path)
    refused = Setting(512, 1, KVCacheType.Q8_0, True)
    measured = _measure(path, refused, state=False)
    assert measured.refused is not None and "n_embd_head_k=16" in measured.refused
    refusal = context_refusal(info, refused.config())
    assert refusal is not None and "16" in refusal
    accepted = Setting(512, 1, KVCacheType.F16, True)
    assert context_refusal(info, accepted.config()) is None
    assert _measure(path, accepted, state=False).refused is None


# ------------------------------------------------------------------------------------------------
# rules these files do not reach, against the llama.cpp source they mirror


def _layout(arch: str, **keys: Any) -> CacheLayout:
    metadata: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.embedding_length": 256,
        f"{arch}.attention.head_count": 8,
    }
    metadata.update({f"{arch}.{key.replace('__', '.')}": value for key, value in keys.items()})
    return cache_layout(Hparams(arch, metadata))


MAMBA2 = {"ssm__conv_kernel": 4, "ssm__inner_size": 512, "ssm__state_size": 64, "ssm__time_step_rank": 16}


def _kinds(layout: CacheLayout) -> str:
    """A = attention cache, M = recurrent state, B = both, . = neither."""
    return "".join(
        "B"
        if layer.in_kv_cache and layer.is_recurrent
        else "A"
        if layer.in_kv_cache
        else "M"
        if layer.is_recurrent
        else "."
        for layer in layout.layers
    )


def test_granite_4_0_h_small_state_per_slot() -> None:
    """Granite-4.0-H-Small (config.json): hidden 4096, 40 layers of which 4 attend (5, 15, 25, 35) with 32
    heads and 8 KV heads of 128, and 36 Mamba-2 layers: expand 2 (d_inner 8192 = 128 heads of 64),
    d_state 128, one group, conv kernel 4. Per slot and Mamba layer: R = 3 * (8192 + 2 * 128) and
    S = 128 * 8192 f32 values, 4,295,680 bytes; 36 layers: 154,644,480 bytes (about 155 MB)."""
    attention = {5, 15, 25, 35}
    layout = _layout(
        "granitehybrid",
        embedding_length=4096,
        block_count=40,
        attention__head_count=32,
        attention__head_count_kv=[8 if il in attention else 0 for il in range(40)],
        ssm__conv_kernel=4,
        ssm__inner_size=8192,
        ssm__state_size=128,
        ssm__time_step_rank=128,
        ssm__group_count=1,
    )
    recurrent = [layer for layer in layout.layers if layer.is_recurrent]
    assert len(recurrent) == 36
    assert {(layer.r_elements, layer.s_elements) for layer in recurrent} == {(3 * (8192 + 256), 128 * 8192)}
    assert sum(4 * (layer.r_elements + layer.s_elements) for layer in recurrent) == 154_644_480
    assert [il for il, layer in enumerate(layout.layers) if layer.in_kv_cache] == sorted(attention)
    assert {layer.k_elements for layer in layout.layers if layer.in_kv_cache} == {8 * 128}


def test_falcon_h1_keeps_both_in_every_layer() -> None:
    layout = _layout("falcon-h1", block_count=3, attention__head_count_kv=2, ssm__group_count=1, **MAMBA2)
    assert _kinds(layout) == "BBB"
    assert layout.layers[0].r_elements == 3 * (512 + 2 * 64)


def test_nemotron_h_mlp_blocks_keep_nothing() -> None:
    # is_recr = no KV heads and no FFN; filter_attn = not recurrent and no FFN: a block with an FFN keeps
    # nothing, even where the header gives it KV heads
    layout = _layout(
        "nemotron_h",
        block_count=4,
        attention__head_count_kv=[0, 2, 2, 0],
        feed_forward_length=[0, 1024, 0, 0],
        ssm__group_count=8,
        **MAMBA2,
    )
    assert _kinds(layout) == "M.AM"
    assert layout.layers[0].r_elements == 3 * (512 + 2 * 8 * 64)


def test_jamba_reads_no_group_count() -> None:
    # Mamba-1: llama_model_jamba never reads ssm.group_count, so B and C take no conv state
    layout = _layout("jamba", block_count=2, attention__head_count_kv=[0, 2], ssm__group_count=8, **MAMBA2)
    assert _kinds(layout) == "MA"
    assert (layout.layers[0].r_elements, layout.layers[0].s_elements) == (3 * 512, 64 * 512)


def test_qwen3next_recurrent_layers() -> None:
    base = {"attention__head_count_kv": 2, "ssm__group_count": 2, **MAMBA2}
    assert _kinds(_layout("qwen3next", block_count=8, **base)) == "MMMAMMMA"  # full_attention_interval 4
    assert _kinds(_layout("qwen3next", block_count=4, full_attention_interval=2, **base)) == "MAMA"
    listed = _layout(
        "qwen3next", block_count=4, attention__recurrent_layers=[True, False, False, True], **base
    )
    assert _kinds(listed) == "MAAM"
    # an MTP block is in neither cache and has no head sizes; every layer's V width stays (V padding)
    mtp = _layout("qwen3next", block_count=5, nextn_predict_layers=1, **base)
    assert _kinds(mtp) == "MMMA."
    assert mtp.layers[4].head_k == 0 and all(layer.v_elements == 2 * 32 for layer in mtp.layers)
    assert not mtp.layers[0].in_kv_cache and mtp.layers[0].head_k == 32


def test_lfm2_state_and_window() -> None:
    layout = _layout("lfm2", block_count=3, attention__head_count_kv=[0, 2, 0], shortconv__l_cache=3)
    assert _kinds(layout) == "MAM"
    assert (layout.layers[0].r_elements, layout.layers[0].s_elements) == (2 * 256, 0)
    assert not layout.has_swa
    windowed = _layout(
        "lfm2",
        block_count=3,
        attention__head_count_kv=[0, 2, 0],
        shortconv__l_cache=3,
        attention__sliding_window=512,
    )
    assert [layer.swa for layer in windowed.layers] == [False, True, False]
    assert (windowed.sliding_window, windowed.swa_type) == (512, "standard")


def test_missing_state_keys_are_refused() -> None:
    # llama.cpp requires the ssm.* keys (get_key without a default): it would not load the file
    with pytest.raises(UnsupportedModelError, match=r"ssm\.group_count"):
        _layout("granitehybrid", block_count=2, attention__head_count_kv=[0, 2], **MAMBA2)
    with pytest.raises(UnsupportedModelError, match=r"shortconv\.l_cache"):
        _layout("lfm2", block_count=2, attention__head_count_kv=[0, 2])

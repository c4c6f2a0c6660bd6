"""The memory model against llama.cpp for dense, sliding-window and mixture-of-experts models.

Every family in :data:`DENSE` is a tiny random-weight GGUF (``tests/support/families/dense.py``);
llama.cpp creates its context exactly as the runtime does (``memory/harness.py``: one unified KV pool
of ``num_ctx x slots`` cells) over a matrix of context sizes, slot counts, cache types, flash
attention and ``swa_full``, and the plan must agree:

* the cell counts of the full and the sliding-window caches, and their layer counts;
* the K and V sizes of each cache at llama.cpp's printed precision (two decimals of a MiB), and the
  bytes of one cell to the byte (from the growth of a sequence's saved state);
* the compute buffer within 10 % through the memory model, and to llama.cpp's printed precision from
  the replay of the architecture's graph (``graph_compute``) given the cache types;
* the output (logits) buffer at the printed precision;
* the same refusals: a q8_0/q4_0 K cache with flash attention for head sizes 80 and 48.

The same matrix runs with a KV stream per slot (llama.cpp without ``kv_unified``, the runtime's
layout before the unified pool); and with more sequence ids than slots (the runtime's prompt cache),
which must change no cache and only what the plan says it changes: the compute buffer's reserved
batch (rounded up to a multiple of the ids) and the output buffer.

Plus the architecture rules that these files cannot reach (other architectures, edge cases of the
sliding-window pattern), checked against the llama.cpp source they mirror.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="the runtime extra (llama-cpp-python) is not installed")

from memory.harness import (  # noqa: E402
    CELL_METADATA_BYTES,
    COMPUTE_TOLERANCE,
    PRINTED,
    Measured,
    MiB,
    Setting,
    measure_setting,
)
from parallama_runtime.planning.architectures import (  # noqa: E402
    CacheLayout,
    ComputeQuery,
    Hparams,
    cache_layout,
)
from parallama_runtime.planning.architectures.graph_replay import graph_compute  # noqa: E402
from parallama_runtime.planning.errors import UnsupportedModelError  # noqa: E402
from parallama_runtime.planning.memory import (  # noqa: E402
    KVCacheType,
    context_refusal,
    estimate_memory,
    kv_cells_per_slot,
    output_buffer_bytes,
    row_size,
    swa_cells_per_slot,
)
from parallama_runtime.planning.model_info import ModelInfo, model_info_from_gguf  # noqa: E402
from support.families import FAMILIES, load_all  # noqa: E402

pytestmark = pytest.mark.llama


DENSE = (
    "llama",
    "llama-tied",
    "deci-per-layer-kv",
    "deci-zero-kv",
    "mixtral",
    "llama-hd80",
    "llama-hd48",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "gemma2",
    "gemma2-default-window",
    "gemma3",
    "gemma3-no-window",
    "cohere2",
    "gpt-oss",
)
ODD_HEADS = {"llama-hd80": 80, "llama-hd48": 48}

load_all()


def _settings(name: str, *, unified: bool = True) -> list[Setting]:
    kv_modes = [(KVCacheType.F16, False), (KVCacheType.F16, True), (KVCacheType.Q8_0, True)]
    if name in ODD_HEADS:
        kv_modes.append((KVCacheType.Q4_0, True))
    swa_full = (False, True) if "swa" in FAMILIES[name].features else (False,)
    return [
        Setting(num_ctx, slots, kv, fa, full, unified=unified)
        for num_ctx, slots, (kv, fa), full in itertools.product((512, 2048), (1, 4), kv_modes, swa_full)
    ]


MORE_IDS = ("llama", "qwen2", "qwen3moe", "gemma3", "gpt-oss")
"""Families checked with more sequence ids than slots: plain dense, biased, mixture of experts, and
two sliding-window ones (whose small cache grows with the ids in a unified pool, which is why the
runtime gives them none: the plan must still say what llama.cpp does)."""


def _more_ids(name: str) -> list[Setting]:
    # 16 ids divide the 512-token micro-batch; 20 and 28 round it up to 520 and 532 tokens
    return [
        Setting(num_ctx, 4, kv, fa, full, n_seq_max=ids)
        for num_ctx, (kv, fa), full, ids in itertools.product(
            (512, 2048),
            [(KVCacheType.F16, False), (KVCacheType.Q8_0, True)],
            (False, True) if "swa" in FAMILIES[name].features else (False,),
            (16, 20, 28),
        )
    ]


ALL_SETTINGS = {
    name: _settings(name) + _settings(name, unified=False) + (_more_ids(name) if name in MORE_IDS else [])
    for name in DENSE
}
CASES = [
    pytest.param(name, setting, id=f"{name}-{setting}") for name in DENSE for setting in ALL_SETTINGS[name]
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ModelInfo]]:
    """Each family's file and the planner's view of it, written once for the module."""
    directory = tmp_path_factory.mktemp("dense")
    written = {}
    for name in DENSE:
        path = FAMILIES[name].write(directory / f"{name}.gguf")
        written[name] = (path, model_info_from_gguf(path))
    return written


def _measure(path: Path, setting: Setting, *, state: bool = False) -> Measured:
    return measure_setting(path, setting, state=state)


def _planned_caches(
    layout: CacheLayout, setting: Setting, cells: int, swa_cells: int
) -> list[dict[str, Any]]:
    """Per cache (full, then sliding-window), its layers and K and V bytes, by llama_kv_cache's rules."""
    config = setting.config()
    widest_v = max(layer.v_elements for layer in layout.layers)
    caches = []
    for swa, n_cells in ((False, cells), (True, swa_cells)) if layout.has_swa else ((False, cells),):
        layers = [layer for layer in layout.layers if layer.in_kv_cache and layer.swa == swa]
        k = sum(row_size(config.type_k, layer.k_elements) for layer in layers)
        v_widths = [layer.v_elements if setting.flash_attention else widest_v for layer in layers]
        v = sum(row_size(config.type_v, width) for width in v_widths)
        streams = 1 if setting.unified else setting.sequences
        caches.append({"layers": len(layers), "k": k * n_cells * streams, "v": v * n_cells * streams})
    return caches


@pytest.mark.parametrize(("name", "setting"), CASES)
def test_plan_matches_llama_cpp(
    models: dict[str, tuple[Path, ModelInfo]], name: str, setting: Setting
) -> None:
    path, info = models[name]
    config = setting.config()
    refusal = context_refusal(info, config)
    measured = _measure(path, setting)
    assert (refusal is None) == (measured.refused is None), (
        f"plan refusal: {refusal!r}; llama.cpp: {measured.refused!r}"
    )
    if refusal is not None:
        return

    estimate = estimate_memory(info, config)
    caches = measured.reports.kv_caches
    layout = info.layout
    assert len(caches) == (2 if layout.has_swa else 1)
    assert {cache.seqs for cache in caches} == {1 if setting.unified else setting.sequences}  # streams
    assert caches[0].cells == estimate.kv_cells_per_slot
    if setting.unified:
        assert estimate.kv_cells_per_slot >= setting.num_ctx * setting.slots  # one pool for every slot
    if layout.has_swa:
        assert caches[1].cells == estimate.swa_cells_per_slot

    planned = _planned_caches(layout, setting, estimate.kv_cells_per_slot, estimate.swa_cells_per_slot)
    for cache, plan in zip(caches, planned, strict=True):
        assert cache.layers == plan["layers"]
        assert cache.type_k == config.type_k.value and cache.type_v == config.type_v.value
        assert abs(cache.k_mib - plan["k"] / MiB) <= PRINTED, (cache, plan)
        assert abs(cache.v_mib - plan["v"] / MiB) <= PRINTED, (cache, plan)
    assert estimate.kv_cache_bytes == sum(plan["k"] + plan["v"] for plan in planned)
    assert abs(measured.reports.total_mib("kv_cache") - estimate.kv_cache_bytes / MiB) <= PRINTED * len(
        caches
    )

    assert estimate.output_buffer_bytes == output_buffer_bytes(info, setting.sequences)
    assert abs(measured.output_mib - estimate.output_buffer_bytes / MiB) <= PRINTED
    assert [d.output_bytes for d in estimate.devices] == [estimate.output_buffer_bytes]  # a CPU plan

    ratio = estimate.compute_bytes / (measured.compute_mib * MiB)
    assert abs(ratio - 1) <= COMPUTE_TOLERANCE, f"compute: planned/llama.cpp = {ratio:.3f}"


@pytest.mark.parametrize("name", MORE_IDS)
def test_more_sequence_ids_change_only_what_the_plan_says(
    models: dict[str, tuple[Path, ModelInfo]], name: str
) -> None:
    """The runtime's prompt cache gives a unified pool more sequence ids than slots. In llama.cpp that
    changes no full-attention cache (one stream of num_ctx x slots cells whatever the ids); it splits
    the reserved graph's micro-batch over the ids (its tokens round up to a multiple of them) and
    keeps a row of logits per id. A small sliding-window cache holds a window per id: the runtime
    gives those models no extra ids, and the plan grows it as llama.cpp does."""
    path, info = models[name]
    settings = {ids: Setting(2048, 4, KVCacheType.F16, False, n_seq_max=ids) for ids in (4, 16, 20)}
    measured = {ids: _measure(path, setting) for ids, setting in settings.items()}
    plans = {ids: estimate_memory(info, setting.config()) for ids, setting in settings.items()}
    full = {(m.reports.kv_caches[0].cells, m.reports.kv_caches[0].mib) for m in measured.values()}
    assert len(full) == 1 and {p.kv_cells_per_slot for p in plans.values()} == {2048 * 4}
    if info.layout.has_swa:
        windows = [m.reports.kv_caches[1].cells for m in measured.values()]
        assert windows == [p.swa_cells_per_slot for p in plans.values()]
        assert windows[0] < windows[-1]  # a window per sequence id
    else:
        assert len({p.kv_cache_bytes for p in plans.values()}) == 1
        # 4 and 16 ids divide the 512-token micro-batch: the same graph; 20 ids reserve 520 tokens
        assert measured[4].compute_mib == measured[16].compute_mib < measured[20].compute_mib
        assert plans[4].compute_bytes == plans[16].compute_bytes < plans[20].compute_bytes
    for ids, m in measured.items():
        assert abs(m.output_mib - 4 * info.vocab_size * ids / MiB) <= PRINTED
        assert plans[ids].output_buffer_bytes == 4 * info.vocab_size * ids


@dataclass(frozen=True)
class _TypedQuery(ComputeQuery):
    """A compute query with the cache types, which quantized caches' Hadamard rotations depend on."""

    type_k: str = "f16"
    type_v: str = "f16"


REPLAY_CASES = [
    pytest.param(name, setting, id=f"{name}-{setting}")
    for name in DENSE
    for setting in ALL_SETTINGS[name]
    if setting.slots == 4 or setting.swa_full
] + [
    pytest.param(name, Setting(num_ctx, 1, KVCacheType.Q8_0, False), id=f"{name}-{num_ctx}x1-q8_0k-nofa")
    for name in DENSE
    for num_ctx in (512, 2048)
]


@pytest.mark.parametrize(("name", "setting"), REPLAY_CASES)
def test_compute_replay_to_the_printed_mib(
    models: dict[str, tuple[Path, ModelInfo]], name: str, setting: Setting
) -> None:
    """The architecture's graph replayed through ggml's allocator gives llama.cpp's compute buffer to
    its printed precision (quantized K without flash attention: V stays f16, K's heads still rotate)."""
    path, info = models[name]
    config = setting.config()
    if context_refusal(info, config) is not None:
        pytest.skip("refused (see test_quantized_k_refused_for_heads_off_the_block)")
    measured = _measure(path, setting)
    assert measured.refused is None, measured.refused
    query = _TypedQuery(
        n_ubatch=config.effective_n_ubatch,
        n_seqs=setting.sequences,
        n_kv=kv_cells_per_slot(
            setting.num_ctx, setting.slots, unified=setting.unified, n_seq_max=setting.sequences
        ),
        n_kv_swa=swa_cells_per_slot(
            info.layout,
            setting.num_ctx,
            setting.slots,
            n_ubatch=config.effective_n_ubatch,
            swa_full=setting.swa_full,
            unified=setting.unified,
            n_seq_max=setting.sequences,
        ),
        flash_attention=setting.flash_attention,
        with_output=True,
        n_vocab=info.vocab_size,
        type_k=config.type_k.value,
        type_v=config.type_v.value,
    )
    planned = graph_compute(info.hparams, info.layout, query) / MiB
    assert abs(planned - measured.compute_mib) <= PRINTED, (planned, measured.compute_mib)


@pytest.mark.parametrize("kv", [KVCacheType.F16, KVCacheType.Q8_0])
@pytest.mark.parametrize("name", [n for n in DENSE if n not in ODD_HEADS])
def test_bytes_per_cell_to_the_byte(
    models: dict[str, tuple[Path, ModelInfo]], name: str, kv: KVCacheType
) -> None:
    """One cell's K and V bytes over all layers, from the growth of a sequence's saved state.

    With flash attention (V rows unpadded, as the state writes them) and ``swa_full`` (so that the
    plan's bytes per token count the sliding-window layers too). A sliding-window model saves each
    cell twice, once per cache, each with its metadata: the harness subtracts one of them.
    """
    path, info = models[name]
    setting = Setting(512, 1, kv, True, swa_full=True)
    measured = _measure(path, setting, state=True)
    assert measured.refused is None, measured.refused
    extra = CELL_METADATA_BYTES if info.layout.has_swa else 0
    assert measured.kv_cell_bytes == estimate_memory(info, setting.config()).kv_bytes_per_token + extra


@pytest.mark.parametrize("kv", [KVCacheType.Q8_0, KVCacheType.Q4_0])
@pytest.mark.parametrize("name", sorted(ODD_HEADS))
def test_quantized_k_refused_for_heads_off_the_block(
    models: dict[str, tuple[Path, ModelInfo]], name: str, kv: KVCacheType
) -> None:
    """llama.cpp refuses a quantized K cache with flash attention when the block (32) does not divide
    the head size; without flash attention (V kept f16) and in f16 it accepts."""
    path, info = models[name]
    head = ODD_HEADS[name]
    refused = Setting(512, 1, kv, True)
    measured = _measure(path, refused)
    assert measured.refused is not None and f"n_embd_head_k={head}" in measured.refused
    refusal = context_refusal(info, refused.config())
    assert refusal is not None and str(head) in refusal
    for accepted in (Setting(512, 1, kv, False), Setting(512, 1, KVCacheType.F16, True)):
        assert context_refusal(info, accepted.config()) is None
        assert _measure(path, accepted).refused is None


# ------------------------------------------------------------------------------------------------
# rules these files do not reach, against the llama.cpp source they mirror


def _layout(arch: str, **keys: Any) -> CacheLayout:
    metadata = {
        "general.architecture": arch,
        f"{arch}.embedding_length": 256,
        f"{arch}.attention.head_count": 8,
    }
    metadata.update({f"{arch}.{key.replace('__', '.')}": value for key, value in keys.items()})
    return cache_layout(Hparams(arch, metadata))


def _sliding(layout: CacheLayout) -> list[bool]:
    return [layer.swa for layer in layout.layers]


def test_default_patterns() -> None:
    # set_swa_pattern: the last layer of each period is global, or the first with dense_first
    assert _sliding(_layout("gemma3", block_count=7, attention__sliding_window=512)) == [True] * 5 + [
        False,
        True,
    ]
    assert _sliding(_layout("gemma2", block_count=4)) == [True, False, True, False]
    assert _layout("gemma2", block_count=4).sliding_window == 4096  # gemma2's default window
    assert _sliding(_layout("cohere2", block_count=5, attention__sliding_window=64)) == [
        True,
        True,
        True,
        False,
        True,
    ]
    smallthinker = _layout("smallthinker", block_count=5, attention__sliding_window=100)
    assert _sliding(smallthinker) == [False, True, True, True, False]
    assert smallthinker.sliding_window == 4096  # the key only turns sliding on


def test_pattern_key_forms() -> None:
    # a scalar replaces the period (0: every layer slides); an array lists the layers, the rest global
    assert _sliding(
        _layout("gpt-oss", block_count=4, attention__sliding_window=128, attention__sliding_window_pattern=3)
    ) == [
        True,
        True,
        False,
        True,
    ]
    every = _layout(
        "gpt-oss", block_count=3, attention__sliding_window=128, attention__sliding_window_pattern=0
    )
    assert _sliding(every) == [True] * 3
    listed = _layout(
        "olmo2", block_count=4, attention__sliding_window=64, attention__sliding_window_pattern=[1, 0, 1]
    )
    assert _sliding(listed) == [True, False, True, False]


def test_optional_windows() -> None:
    # gemma3, olmo2: sliding only with a positive window; phi3 never (llama.cpp disables it);
    # exaone4 only at 64 layers; llama4 chunks unless the window is 0, at a fixed 8192
    assert not _layout("gemma3", block_count=6).has_swa
    assert not _layout("olmo2", block_count=4, attention__sliding_window=0).has_swa
    assert not _layout("phi3", block_count=4, attention__sliding_window=2048).has_swa
    assert not _layout("exaone4", block_count=32, attention__sliding_window=4096).has_swa
    assert _sliding(_layout("exaone4", block_count=64))[:4] == [True, True, True, False]
    llama4 = _layout("llama4", block_count=4, attention__sliding_window=1000)
    assert (llama4.swa_type, llama4.sliding_window, _sliding(llama4)) == (
        "chunked",
        8192,
        [True, True, True, False],
    )
    assert not _layout("llama4", block_count=4, attention__sliding_window=0).has_swa


def test_models_llama_cpp_aborts_on_or_refuses_to_load() -> None:
    with pytest.raises(UnsupportedModelError, match="no sliding layer"):  # GGML_ASSERT(is_swa_any())
        _layout("gemma2", block_count=4, attention__sliding_window_pattern=1)
    with pytest.raises(UnsupportedModelError, match="sliding_window"):  # a required key
        _layout("cohere2", block_count=4)
    with pytest.raises(UnsupportedModelError, match="sliding_window_pattern"):  # granite_swa: an array
        _layout(
            "granite_swa", block_count=4, attention__sliding_window=512, attention__sliding_window_pattern=4
        )


def test_nextn_layers_keep_no_cache() -> None:
    """create_memory's default branch filters the NextN/MTP layers out of the trunk's cache, and the
    head-size checks run over the trunk only; their V width still counts for the V padding."""
    layout = _layout("glm4moe", block_count=3, nextn_predict_layers=1, attention__head_count_kv=[2, 2, 8])
    assert [layer.in_kv_cache for layer in layout.layers] == [True, True, False]
    assert layout.layers[2].head_k == 0 and layout.layers[2].v_elements == 8 * 32


def test_per_layer_kv_heads() -> None:
    layout = _layout(
        "deci", block_count=3, attention__head_count=[8, 8, 0], attention__head_count_kv=[2, 0, 0]
    )
    assert [layer.k_elements for layer in layout.layers] == [64, 0, 0]
    assert [layer.in_kv_cache for layer in layout.layers] == [True, True, True]  # zero-width K rows
    assert [layer.head_k for layer in layout.layers] == [32, 32, 32]

"""The memory model against what llama.cpp itself allocates, on generated models.

llama.cpp reports each buffer it allocates in its log (MiB, two decimals) and the KV cache's cell
and layer counts. The KV cache must match exactly: the same cell count, and the same size at the
printed precision for K, V and their sum. Weights must be within 1 %, the compute buffer within 10 %.
Contexts are created as the runtime does (one unified KV pool of ``num_ctx x slots`` cells) and, for
comparison, with a KV stream per slot.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from parallama_runtime.demo_model import DEMO_SHAPE, ModelShape, write_model
from parallama_runtime.planning.memory import (
    KVCacheType,
    MemoryConfig,
    estimate_memory,
    kv_cells_per_slot,
    row_size,
)
from parallama_runtime.planning.model_info import ModelInfo, model_info_from_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="the runtime extra (llama-cpp-python) is not installed")
from parallama_runtime.engine.llama_log import LlamaLogCapture, parse_buffer_reports  # noqa: E402

pytestmark = pytest.mark.llama

MiB = 1024 * 1024
SHAPES = {
    "demo": DEMO_SHAPE,
    # wider, fewer KV heads (GQA 8:1) and a larger vocabulary than the demo model
    "gqa": ModelShape(
        block_count=3,
        embedding_length=512,
        head_count=16,
        head_count_kv=2,
        feed_forward_length=1536,
        vocab_size=4000,
        dtype="f16",
        name="gqa",
    ),
}


@pytest.fixture(scope="module")
def capture() -> LlamaLogCapture:
    capture = LlamaLogCapture.install()
    llama_cpp.llama_backend_init()
    return capture


@pytest.fixture(scope="module", params=sorted(SHAPES))
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, capture: LlamaLogCapture
) -> Iterator[tuple[ModelInfo, Any, list[str]]]:
    path: Path = write_model(tmp_path_factory.mktemp("mem") / f"{request.param}.gguf", SHAPES[request.param])
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = False  # as the runtime: no AMX / repacked copies (docs/memory-model.md)
    mark = capture.mark()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, "llama.cpp could not load the generated model"
    yield model_info_from_gguf(path), model, capture.since(mark)
    llama_cpp.llama_model_free(model)


def test_weights_within_one_percent(loaded: tuple[ModelInfo, Any, list[str]]) -> None:
    info, _, load_log = loaded
    reported = parse_buffer_reports(load_log).total_mib("weights") * MiB
    planned = estimate_memory(info, MemoryConfig(gpu_layers=0)).weights_bytes
    assert reported > 0, "llama.cpp reported no model buffer"
    assert abs(planned - reported) / reported < 0.01


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("num_ctx", [512, 2048, 4096])
@pytest.mark.parametrize("slots", [1, 2, 4])
@pytest.mark.parametrize(("kv_type", "flash_attention"), [("f16", False), ("q8_0", True)])
def test_kv_exact_and_compute_within_ten_percent(
    loaded: tuple[ModelInfo, Any, list[str]],
    capture: LlamaLogCapture,
    num_ctx: int,
    slots: int,
    kv_type: str,
    flash_attention: bool,
    unified: bool,
) -> None:
    info, model, _ = loaded
    config = MemoryConfig(
        num_ctx=num_ctx,
        num_parallel=slots,
        kv_cache_type=KVCacheType(kv_type),
        flash_attention=flash_attention,
        gpu_layers=0,
        kv_unified=unified,
        n_seq_max=slots,
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = num_ctx * slots
    params.n_seq_max = slots
    params.kv_unified = unified
    params.n_batch = params.n_ubatch = config.n_ubatch
    params.flash_attn_type = 1 if flash_attention else 0
    params.type_k = config.type_k.ggml_type
    params.type_v = config.type_v.ggml_type
    mark = capture.mark()
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx, "llama.cpp refused the context"
    try:
        reports = parse_buffer_reports(capture.since(mark))
    finally:
        llama_cpp.llama_free(ctx)
    planned = estimate_memory(info, config)

    kv = reports.kv
    assert kv is not None, "llama.cpp printed no KV cache summary"
    assert kv.cells == kv_cells_per_slot(num_ctx, slots, unified=unified) == planned.kv_cells_per_slot
    streams = 1 if unified else slots
    assert kv.seqs == streams
    assert kv.layers == info.block_count
    assert (kv.type_k, kv.type_v) == (config.type_k.value, config.type_v.value)
    # exact at llama.cpp's printed precision: the total, the buffer, and K and V on their own
    cells = planned.kv_cells_per_slot * streams
    planned_k = sum(row_size(config.type_k, info.k_elements(i)) for i in range(info.block_count)) * cells
    planned_v = sum(row_size(config.type_v, info.v_elements(i)) for i in range(info.block_count)) * cells
    assert planned_k + planned_v == planned.kv_cache_bytes
    assert f"{planned.kv_cache_bytes / MiB:.2f}" == f"{kv.mib:.2f}"
    assert f"{reports.total_mib('kv_cache'):.2f}" == f"{kv.mib:.2f}"
    assert (f"{planned_k / MiB:.2f}", f"{planned_v / MiB:.2f}") == (f"{kv.k_mib:.2f}", f"{kv.v_mib:.2f}")

    measured_compute = reports.total_mib("compute") * MiB
    assert measured_compute > 0
    error = (planned.compute_bytes - measured_compute) / measured_compute
    assert abs(error) < 0.10, f"compute buffer off by {error:+.1%}"


@pytest.mark.parametrize(("kv_type", "flash_attention"), [("f16", False), ("q8_0", True), ("q4_0", True)])
def test_kv_bytes_per_token_exact_to_the_byte(
    loaded: tuple[ModelInfo, Any, list[str]], kv_type: str, flash_attention: bool
) -> None:
    """llama.cpp serialises a sequence's cells with their K and V rows: one more token in the cache
    makes the state grow by exactly the KV bytes of one cell, plus its 12 bytes of cell metadata
    (position, sequence count, sequence id). That is a byte-exact reading of llama.cpp's row sizes."""
    info, model, _ = loaded
    config = MemoryConfig(
        num_ctx=512, num_parallel=2, kv_cache_type=KVCacheType(kv_type), flash_attention=flash_attention
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = 1024, 2, False
    params.flash_attn_type = 1 if flash_attention else 0
    params.type_k, params.type_v = config.type_k.ggml_type, config.type_v.ggml_type
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    try:
        sizes = []
        tokens = (llama_cpp.llama_token * 9)(*range(3, 12))
        for start, count in ((0, 8), (8, 1)):
            batch = llama_cpp.llama_batch_get_one(
                ctypes.cast(ctypes.byref(tokens, start * 4), ctypes.POINTER(llama_cpp.llama_token)), count
            )
            assert llama_cpp.llama_decode(ctx, batch) == 0
            sizes.append(llama_cpp.llama_state_seq_get_size(ctx, 0))
        other_slot = llama_cpp.llama_state_seq_get_size(ctx, 1)
    finally:
        llama_cpp.llama_free(ctx)
    per_token = estimate_memory(info, config).kv_bytes_per_token
    assert sizes[1] - sizes[0] == per_token + 12
    assert other_slot < sizes[0] - 7 * per_token, "slot 1 must hold none of slot 0's cells"
